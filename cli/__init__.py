"""The command line (`grok1 ...`): the top layer, which nothing else imports."""

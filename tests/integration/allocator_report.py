"""Run by tests/integration/test_allocator.py through run_local_group: prints this process's malloc library."""

from workers.allocator import allocator_in_use

if __name__ == "__main__":
    print(allocator_in_use())

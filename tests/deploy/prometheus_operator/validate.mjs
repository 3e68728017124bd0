// Validates prometheus-operator objects (a JSON list on stdin) with @kubernetes-models/prometheus-operator:
// 1. its schema validator, generated from the operator's Go API types (types, enums, patterns, required);
// 2. TypeScript's excess-property check of each object as a literal of the package's interface, which the
//    schema validator lacks: an unknown field (a typo) is an error, as kubectl's strict field validation makes it.
// Prints a JSON list: for each object, its errors (empty when valid).
import { readFileSync, mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const KINDS = {
  PodMonitor: "monitoring.coreos.com/v1/PodMonitor",
  ServiceMonitor: "monitoring.coreos.com/v1/ServiceMonitor",
};
const here = dirname(fileURLToPath(import.meta.url));
const docs = JSON.parse(readFileSync(0, "utf8"));
const errors = [];
for (const doc of docs) {
  const path = KINDS[doc.kind];
  if (!path || doc.apiVersion !== "monitoring.coreos.com/v1") {
    errors.push([`unknown kind ${doc.apiVersion}/${doc.kind}`]);
    continue;
  }
  const model = await import(`@kubernetes-models/prometheus-operator/${path}`);
  try {
    new model[doc.kind](doc).validate();
    errors.push([]);
  } catch (err) {
    errors.push([String(err.message)]);
  }
}

// The TypeScript check: one file of typed literals, type-checked against the package's declarations.
const dir = mkdtempSync(join(here, ".check-"));
try {
  const lines = docs.map((doc, k) => KINDS[doc.kind] ?
    `import type { I${doc.kind} as T${k} } from "@kubernetes-models/prometheus-operator/${KINDS[doc.kind]}";\n` +
    `export const doc${k}: T${k} = ${JSON.stringify(doc)};` : "\n");
  const file = join(dir, "docs.ts");
  writeFileSync(file, lines.join("\n"));
  const program = ts.createProgram([file], {
    noEmit: true, strict: true, skipLibCheck: true, target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext,
  });
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const line = d.file ? d.file.getLineAndCharacterOfPosition(d.start).line : 0;
    const k = Math.floor(line / 2);  // two lines per object
    const message = ts.flattenDiagnosticMessageText(d.messageText, " ");
    (errors[k] ?? errors[0]).push(`typescript: ${message}`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(JSON.stringify(errors));

// Builds policy.js (next to this file) into a component of the handshake-policy world.
// Usage: node build.mjs [OUT.wasm] [WIT_DIR]
// @bytecodealliance/componentize-js must be installed in a node_modules next to this file or
// above it (`npm install @bytecodealliance/componentize-js@0.23.0`).
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, 'tenant_route.wasm');
const { component } = await componentize({
  sourcePath: join(here, 'policy.js'),
  witPath: process.argv[3] ?? join(here, '..', '..', 'wit'),
  worldName: 'handshake-policy',
  // A pure component: no WASI at all (no clocks, randomness, stdio or network).
  disableFeatures: ['random', 'stdio', 'clocks', 'http', 'fetch-event'],
});
await writeFile(out, component);
console.log(`wrote ${out} (${component.length} bytes)`);

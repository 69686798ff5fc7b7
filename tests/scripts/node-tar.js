// The npm `tar` package (what Node services use; pinned and installed into
// .tools/node by scripts/test.sh), both ways:
//   node node-tar.js extract ARCHIVE DEST         file mode (tar.x({file}))
//   node node-tar.js extract-stream ARCHIVE DEST  a read stream piped into tar.x()
//   node node-tar.js create ARCHIVE DIR           a tar.gz of DIR's entries (tar.c({gzip}))
'use strict';
const fs = require('fs');
const path = require('path');
const tar = require(path.join(__dirname, '../../.tools/node/node_modules/tar'));

const [mode, archive, dir] = process.argv.slice(2);
const fail = (e) => {
  console.error(`node tar ${mode}: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
};
// Warnings (an entry refused, a link out of the tree) are failures here.
const onwarn = (code, message) => fail(`${code}: ${message}`);

if (mode === 'extract') {
  tar.x({ file: archive, cwd: dir, sync: true, strict: true, onwarn });
} else if (mode === 'extract-stream') {
  fs.createReadStream(archive)
    .on('error', fail)
    .pipe(tar.x({ cwd: dir, strict: true, onwarn }))
    .on('error', fail)
    .on('close', () => process.exit(0));
} else if (mode === 'create') {
  tar.c({ gzip: true, file: archive, cwd: dir, sync: true, portable: false },
    fs.readdirSync(dir).sort());
} else {
  fail(`unknown mode ${mode}`);
}

// Extracts a tar.gz with nothing but Node's own zlib and a minimal tar parser
// (ustar + PAX path/linkpath/size), as a Node service without dependencies would.
// usage: node node-extract.js ARCHIVE DEST
'use strict';
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');

const [archive, dest] = process.argv.slice(2);
const data = zlib.gunzipSync(fs.readFileSync(archive));
const str = (buf, off, len) => {
  const s = buf.subarray(off, off + len);
  const nul = s.indexOf(0);
  return (nul === -1 ? s : s.subarray(0, nul)).toString('utf8');
};
const octal = (buf, off, len) => parseInt(str(buf, off, len).trim() || '0', 8);

let pos = 0;
let pax = {};
const links = [];
while (pos + 512 <= data.length) {
  const h = data.subarray(pos, pos + 512);
  if (h.every((b) => b === 0)) break;
  const type = String.fromCharCode(h[156] || 48);
  let size = octal(h, 124, 12);
  if (pax.size !== undefined) size = Number(pax.size);
  const prefix = str(h, 345, 155);
  let name = pax.path || (prefix ? prefix + '/' : '') + str(h, 0, 100);
  const linkname = pax.linkpath || str(h, 157, 100);
  const mode = octal(h, 100, 8) & 0o7777;
  const body = data.subarray(pos + 512, pos + 512 + size);
  pos += 512 + Math.ceil(size / 512) * 512;
  if (type === 'x') {
    pax = {};
    let i = 0;
    while (i < body.length) {
      const sp = body.indexOf(32, i);
      const len = parseInt(body.subarray(i, sp).toString(), 10);
      const rec = body.subarray(sp + 1, i + len - 1).toString('utf8');
      const eq = rec.indexOf('=');
      pax[rec.slice(0, eq)] = rec.slice(eq + 1);
      i += len;
    }
    continue;
  }
  pax = {};
  name = name.replace(/\/$/, '');
  const target = path.join(dest, name);
  fs.mkdirSync(path.dirname(target), { recursive: true });
  if (type === '5') {
    fs.mkdirSync(target, { recursive: true });
    fs.chmodSync(target, mode);
  } else if (type === '2') {
    fs.symlinkSync(linkname, target);
  } else if (type === '1') {
    links.push([path.join(dest, linkname), target]);
  } else if (type === '0' || type === '\0') {
    fs.writeFileSync(target, body);
    fs.chmodSync(target, mode);
  }
}
for (const [from, to] of links) fs.linkSync(from, to);

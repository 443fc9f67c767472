// End-to-end: the stock `e2b` 2.51.0 and `@e2b/code-interpreter` 2.8.0
// SDKs (unmodified, from npm) against a real cube-agent on loopback.
// Run by `make test-agent-e2e` (NODE_PATH points at the cached packages).
'use strict';
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const harness = require('./harness.cjs');

let h, Sandbox, CommandExitError, sbx;

before(async () => {
  h = await harness.start();
  ({ Sandbox } = require('@e2b/code-interpreter'));
  ({ CommandExitError } = require('e2b'));
  sbx = await Sandbox.create({ timeoutMs: 600000 });
});

after(async () => {
  require('node:fs').rmSync(dir, { recursive: true, force: true });
  if (sbx) await sbx.kill();
  if (h) await h.stop();
});

const dir = `/tmp/cube-e2e-${process.pid}`;

test('isRunning', async () => {
  assert.equal(await sbx.isRunning(), true);
});

test('commands.run: stdout, stderr, env, exit codes', async () => {
  const r = await sbx.commands.run('echo hello; echo oops >&2; echo $SANDBOX_VAR $MYVAR', { envs: { MYVAR: 'mine' } });
  assert.equal(r.exitCode, 0);
  assert.equal(r.stdout, 'hello\nfrom-init mine\n');
  assert.equal(r.stderr, 'oops\n');
  await assert.rejects(sbx.commands.run('exit 7'), (e) => e instanceof CommandExitError && e.exitCode === 7);
  const cwd = await sbx.commands.run('pwd', { cwd: '/tmp' });
  assert.equal(cwd.stdout, '/tmp\n');
});

test('commands.run: streaming callbacks fire per chunk', async () => {
  const seen = [];
  const r = await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 0.2; done', { onStdout: (d) => seen.push([Date.now(), d]) });
  assert.equal(r.stdout, 'line1\nline2\nline3\n');
  assert.ok(seen.length >= 3, `expected 3 stdout events, got ${seen.length}`);
  assert.ok(seen[2][0] - seen[0][0] >= 300, 'output arrived all at once, not streamed');
});

test('commands: background, list, kill', async () => {
  const handle = await sbx.commands.run('sleep 100', { background: true });
  assert.ok(handle.pid > 0);
  const list = await sbx.commands.list();
  assert.ok(list.some((p) => p.pid === handle.pid), 'background process listed');
  assert.equal(await sbx.commands.kill(handle.pid), true);
  await assert.rejects(handle.wait(), (e) => e instanceof CommandExitError && e.exitCode === -1);
  assert.equal(await sbx.commands.kill(999999), false);
});

test('pty: create, input, resize, exit', async () => {
  let out = '';
  const dec = new TextDecoder();
  const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { out += dec.decode(d, { stream: true }); } });
  await sbx.pty.resize(term.pid, { cols: 100, rows: 40 });
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; echo $((6*7))Z; exit\n'));
  await term.wait().catch(() => {});
  assert.match(out, /40 100/);
  assert.match(out, /42Z/);
});

test('files: text and binary round trip', async () => {
  await sbx.files.write(`${dir}/t/hello.txt`, 'hello world');
  assert.equal(await sbx.files.read(`${dir}/t/hello.txt`), 'hello world');
  const bin = crypto.randomBytes(70000);
  await sbx.files.write(`${dir}/t/bin.dat`, bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.length));
  const back = await sbx.files.read(`${dir}/t/bin.dat`, { format: 'bytes' });
  assert.equal(Buffer.compare(Buffer.from(back), bin), 0);
  const gz = await sbx.files.read(`${dir}/t/bin.dat`, { format: 'bytes', gzip: true });
  assert.equal(Buffer.compare(Buffer.from(gz), bin), 0);
  await sbx.files.write(`${dir}/t/empty`, '');
  assert.equal(await sbx.files.read(`${dir}/t/empty`), '');
  const multi = await sbx.files.write([{ path: `${dir}/m/a.txt`, data: 'A' }, { path: `${dir}/m/b.txt`, data: 'B' }]);
  assert.equal(multi.length, 2);
  assert.equal(await sbx.files.read(`${dir}/m/b.txt`), 'B');
  await assert.rejects(sbx.files.read(`${dir}/missing`), /not found|no such/i);
});

test('files: 100 MB upload and download', async () => {
  const big = crypto.randomBytes(100 << 20);
  const sum = crypto.createHash('sha256').update(big).digest('hex');
  await sbx.files.write(`${dir}/big.bin`, big.buffer.slice(big.byteOffset, big.byteOffset + big.length));
  const r = await sbx.commands.run(`sha256sum ${dir}/big.bin`);
  assert.equal(r.stdout.split(' ')[0], sum);
  const back = await sbx.files.read(`${dir}/big.bin`, { format: 'bytes' });
  assert.equal(back.length, big.length);
  assert.equal(crypto.createHash('sha256').update(back).digest('hex'), sum);
  await sbx.files.remove(`${dir}/big.bin`);
});

test('files: list, makeDir, exists, getInfo, rename, remove', async () => {
  assert.equal(await sbx.files.makeDir(`${dir}/d/e`), true);
  assert.equal(await sbx.files.makeDir(`${dir}/d/e`), false);
  await sbx.files.write(`${dir}/d/f.txt`, '12345');
  const entries = await sbx.files.list(`${dir}/d`);
  assert.deepEqual(entries.map((e) => `${e.name}:${e.type}`).sort(), ['e:dir', 'f.txt:file']);
  const info = await sbx.files.getInfo(`${dir}/d/f.txt`);
  assert.equal(info.size, 5);
  assert.equal(info.type, 'file');
  assert.equal(await sbx.files.exists(`${dir}/d/f.txt`), true);
  const moved = await sbx.files.rename(`${dir}/d/f.txt`, `${dir}/d/g.txt`);
  assert.equal(moved.path, `${dir}/d/g.txt`);
  assert.equal(await sbx.files.exists(`${dir}/d/f.txt`), false);
  await sbx.files.remove(`${dir}/d`);
  assert.equal(await sbx.files.exists(`${dir}/d`), false);
});

test('files: metadata', async () => {
  const [w] = [await sbx.files.write(`${dir}/meta.txt`, 'm', { metadata: { owner: 'alice' } })];
  assert.equal(w.metadata?.owner, 'alice');
  const info = await sbx.files.getInfo(`${dir}/meta.txt`);
  assert.equal(info.metadata?.owner, 'alice');
});

test('files: watchDir', async () => {
  await sbx.files.makeDir(`${dir}/w`);
  const events = [];
  let resolve;
  const got = new Promise((r) => { resolve = r; });
  const w = await sbx.files.watchDir(`${dir}/w`, (ev) => { events.push(ev); if (ev.name === 'new.txt' && ev.type === 'write') resolve(); });
  await sbx.files.write(`${dir}/w/new.txt`, 'x');
  await Promise.race([got, new Promise((_, rej) => setTimeout(() => rej(new Error('no watch event: ' + JSON.stringify(events))), 10000))]);
  await w.stop();
  assert.ok(events.some((e) => e.name === 'new.txt' && e.type === 'create'));
});

test('runCode: state across calls, stdout, results', async () => {
  const a = await sbx.runCode('x = 41\nprint("hi")');
  assert.deepEqual(a.logs.stdout, ['hi\n']);
  const b = await sbx.runCode('x + 1');
  assert.equal(b.text, '42');
  assert.equal(b.error, undefined);
});

test('runCode: error objects', async () => {
  const e = await sbx.runCode('1/0');
  assert.equal(e.error.name, 'ZeroDivisionError');
  assert.equal(e.error.value, 'division by zero');
  assert.match(e.error.traceback, /ZeroDivisionError/);
});

test('runCode: matplotlib PNG', async () => {
  const r = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()');
  assert.equal(r.results.length, 1);
  const png = Buffer.from(r.results[0].png, 'base64');
  assert.equal(png.subarray(1, 4).toString(), 'PNG');
});

test('runCode: two contexts do not share state', async () => {
  const c1 = await sbx.createCodeContext({ cwd: '/tmp' });
  const c2 = await sbx.createCodeContext();
  await sbx.runCode('only_here = 5', { context: c1 });
  const r = await sbx.runCode('only_here', { context: c2 });
  assert.equal(r.error.name, 'NameError');
  const cwd = await sbx.runCode('import os; os.getcwd()', { context: c1 });
  assert.equal(cwd.text, '/tmp');
  const list = await sbx.listCodeContexts();
  assert.ok(list.some((c) => c.id === c1.id));
  await sbx.removeCodeContext(c1);
  await sbx.removeCodeContext(c2);
});

test('runCode: bash language', async () => {
  const r = await sbx.runCode('echo $((2+3))', { language: 'bash' });
  assert.deepEqual(r.logs.stdout, ['5\n']);
});

test('commands.run and files as another user (Basic auth user selection)', async () => {
  const r = await sbx.commands.run('id -un', { user: 'nobody' });
  assert.equal(r.stdout, 'nobody\n');
  await assert.rejects(sbx.files.write('/root/cube-e2e-denied.txt', 'x', { user: 'nobody' }));
});

test('runCode: per-call envs, javascript, timeout interrupts', async () => {
  const e = await sbx.runCode('import os; os.environ.get("PER_CALL")', { envs: { PER_CALL: 'yes' } });
  assert.equal(e.text, 'yes');
  const js = await sbx.runCode('const q = 20; q + 22', { language: 'js' });
  assert.equal(js.text, '42');
  await assert.rejects(sbx.runCode('import time\ntime.sleep(30)', { timeoutMs: 1500 }));
  const after = await sbx.runCode('6 * 7');
  assert.equal(after.text, '42');
});

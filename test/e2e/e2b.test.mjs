// End-to-end: the stock E2B SDKs (e2b 2.51.0, @e2b/code-interpreter 2.8.0,
// and e2b 2.45.0 which uses the v1 create/connect routes) against a real
// `cube server` on the gVisor runtime with the built-in templates. Only the
// three environment variables of the compatibility spec point them at Cube.
import { describe, test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import path from 'node:path'
import fs from 'node:fs'
import { startServer, require, sleep } from './harness.mjs'

const [major, minor] = process.versions.node.split('.').map(Number)
const nodeOK = major > 20 || (major === 20 && minor >= 18)

describe('stock E2B SDKs against cube server', { skip: nodeOK ? false : `e2b 2.51 needs node >= 20.18 (have ${process.versions.node})` }, () => {
  let srv, Sandbox, CISandbox, Sandbox245, errors
  before(async () => {
    srv = await startServer()
    ;({ Sandbox } = require('e2b'))
    errors = require('e2b')
    ;({ Sandbox: CISandbox } = require('@e2b/code-interpreter'))
    ;({ Sandbox: Sandbox245 } = require('e2b-245'))
  })
  after(async () => {
    if (!srv) return
    const left = await srv.stop()
    assert.deepEqual(left, [], 'processes left behind after the server stopped')
  })

  test('create, getInfo, list, commands, kill, isRunning (e2b 2.51)', async () => {
    const sbx = await Sandbox.create('base', { envs: { CUBE_E2E: 'yes' }, metadata: { suite: 'e2e', case: 'basic' } })
    assert.match(sbx.sandboxId, /^[a-z0-9]+$/)
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.state, 'running')
    assert.equal(info.metadata.case, 'basic')
    const r = await sbx.commands.run('echo hello $CUBE_E2E; id -un')
    assert.equal(r.exitCode, 0)
    assert.match(r.stdout, /^hello yes\n/)
    await assert.rejects(sbx.commands.run('exit 3'), (e) => e.exitCode === 3)
    const page = await Sandbox.list({ query: { metadata: { case: 'basic' } } }).nextItems()
    assert.deepEqual(page.map((s) => s.sandboxId), [sbx.sandboxId])
    assert.equal(await sbx.isRunning(), true)
    assert.equal(await sbx.kill(), true)
    assert.equal(await sbx.isRunning(), false)
    assert.equal(await Sandbox.kill(sbx.sandboxId), false)
    await assert.rejects(sbx.getInfo(), errors.SandboxNotFoundError ?? Error)
  })

  test('files: write, read, list, exists (e2b 2.51)', async () => {
    const sbx = await Sandbox.create('base')
    try {
      await sbx.files.write('/tmp/e2e/a.txt', 'alpha')
      await sbx.files.write([{ path: '/tmp/e2e/b.bin', data: new Uint8Array([0, 1, 2, 255]).buffer }])
      assert.equal(await sbx.files.read('/tmp/e2e/a.txt'), 'alpha')
      const bytes = await sbx.files.read('/tmp/e2e/b.bin', { format: 'bytes' })
      assert.deepEqual([...bytes], [0, 1, 2, 255])
      const names = (await sbx.files.list('/tmp/e2e')).map((e) => e.name).sort()
      assert.deepEqual(names, ['a.txt', 'b.bin'])
      assert.equal(await sbx.files.exists('/tmp/e2e/nope'), false)
      const r = await sbx.commands.run('cat /tmp/e2e/a.txt')
      assert.equal(r.stdout, 'alpha')
    } finally {
      await sbx.kill()
    }
  })

  test('runCode returns a PNG (code-interpreter 2.8)', async () => {
    const sbx = await CISandbox.create()
    try {
      const ex = await sbx.runCode('x = 41\nx + 1')
      assert.equal(ex.text, '42')
      const plot = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()')
      assert.equal(plot.error, undefined)
      const png = plot.results.find((r) => r.png)
      assert.ok(png, 'a result with a PNG')
      assert.ok(Buffer.from(png.png, 'base64').subarray(0, 4).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47])))
    } finally {
      await sbx.kill()
    }
  })

  test('setTimeout expiry kills the sandbox', async () => {
    const sbx = await Sandbox.create('base', { timeoutMs: 120_000 })
    await sbx.setTimeout(2_000)
    await sleep(4_000)
    assert.equal(await sbx.isRunning(), false)
    await assert.rejects(sbx.getInfo())
  })

  test('pause and connect keep files and a running process', async () => {
    const sbx = await Sandbox.create('base')
    try {
      await sbx.files.write('/home/user/keep.txt', 'kept across pause')
      const bg = await sbx.commands.run('sleep 600', { background: true })
      assert.equal(await sbx.pause(), true)
      assert.equal((await sbx.getInfo()).state, 'paused')
      assert.equal(await sbx.isRunning(), false)
      const again = await Sandbox.connect(sbx.sandboxId)
      assert.equal(again.sandboxId, sbx.sandboxId)
      assert.equal((await again.getInfo()).state, 'running')
      assert.equal(await again.files.read('/home/user/keep.txt'), 'kept across pause')
      const procs = await again.commands.list()
      assert.ok(procs.some((p) => p.pid === bg.pid), `pid ${bg.pid} still running: ${JSON.stringify(procs)}`)
    } finally {
      await Sandbox.kill(sbx.sandboxId)
    }
  })

  test('snapshots: createSnapshot, create from it, listSnapshots, fork, deleteSnapshot', async () => {
    const sbx = await Sandbox.create('base', { metadata: { case: 'snap' } })
    const made = []
    try {
      await sbx.files.write('/home/user/snap.txt', 'before snapshot')
      const snap = await sbx.createSnapshot({ name: 'e2e-snap' })
      assert.match(snap.snapshotId, /^[a-z0-9]+$/)
      assert.deepEqual(snap.names, ['e2e-snap'])
      // The sandbox keeps running and goes on changing.
      assert.equal(await sbx.isRunning(), true)
      await sbx.files.write('/home/user/snap.txt', 'after snapshot')
      // Create from the snapshot by id and by name: the file as it was.
      const fromId = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 })
      made.push(fromId)
      assert.equal(await fromId.files.read('/home/user/snap.txt'), 'before snapshot')
      const fromName = await Sandbox.create('e2e-snap', { timeoutMs: 120_000 })
      made.push(fromName)
      assert.equal((await fromName.commands.run('cat /home/user/snap.txt')).stdout, 'before snapshot')
      assert.notEqual(fromId.sandboxId, fromName.sandboxId)
      // List, filter, page; another key sees none of them.
      const snap2 = await Sandbox.createSnapshot(sbx.sandboxId)
      assert.deepEqual(snap2.names, [])
      const listed = await Sandbox.listSnapshots({ sandboxId: sbx.sandboxId, name: 'e2e-snap' }).nextItems()
      assert.deepEqual(listed, [{ snapshotId: snap.snapshotId, names: ['e2e-snap'] }])
      const p = Sandbox.listSnapshots({ sandboxId: sbx.sandboxId, limit: 1 })
      const ids = []
      while (p.hasNext) ids.push(...(await p.nextItems()).map((s) => s.snapshotId))
      assert.deepEqual(ids.sort(), [snap.snapshotId, snap2.snapshotId].sort())
      assert.deepEqual(await Sandbox.listSnapshots({ apiKey: srv.key2 }).nextItems(), [])
      // Fork: two sandboxes with the parent's current state that diverge.
      const forks = await sbx.fork({ count: 2, timeoutMs: 120_000 })
      assert.equal(forks.length, 2)
      for (const f of forks) {
        assert.ok(f instanceof Sandbox, `fork failed: ${f}`)
        made.push(f)
        assert.equal(await f.files.read('/home/user/snap.txt'), 'after snapshot')
        await f.files.write('/home/user/snap.txt', f.sandboxId)
      }
      assert.notEqual(forks[0].sandboxId, forks[1].sandboxId)
      for (const f of forks) assert.equal((await f.commands.run('cat /home/user/snap.txt')).stdout, f.sandboxId)
      assert.equal(await sbx.files.read('/home/user/snap.txt'), 'after snapshot')
      await assert.rejects(Sandbox.fork(sbx.sandboxId, { count: 2, apiKey: srv.key2 }), errors.SandboxNotFoundError ?? Error)
      // Delete: true once, then false; the sandboxes made from it run on.
      assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId, { apiKey: srv.key2 }), false)
      assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
      assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), false)
      assert.equal(await Sandbox.deleteSnapshot(snap2.snapshotId), true)
      await assert.rejects(Sandbox.deleteSnapshot('base'))
      await assert.rejects(Sandbox.create(snap.snapshotId))
      assert.deepEqual(await Sandbox.listSnapshots({ sandboxId: sbx.sandboxId }).nextItems(), [])
      assert.equal((await fromId.commands.run('cat /home/user/snap.txt')).stdout, 'before snapshot')
      assert.equal(await Sandbox.create('base').then((s) => { made.push(s); return s.isRunning() }), true)
    } finally {
      for (const s of made) await Sandbox.kill(s.sandboxId)
      await sbx.kill()
    }
  })

  test('snapshot of a paused sandbox: created from, original resumes', async () => {
    const sbx = await Sandbox.create('base')
    const made = []
    try {
      await sbx.files.write('/home/user/paused.txt', 'written before pause')
      assert.equal(await sbx.pause(), true)
      const snap = await Sandbox.createSnapshot(sbx.sandboxId)
      assert.match(snap.snapshotId, /^[a-z0-9]+$/)
      assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
      const child = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 })
      made.push(child)
      assert.equal(await child.files.read('/home/user/paused.txt'), 'written before pause')
      const again = await Sandbox.connect(sbx.sandboxId)
      assert.equal((await again.getInfo()).state, 'running')
      assert.equal(await again.files.read('/home/user/paused.txt'), 'written before pause')
      await child.files.write('/home/user/paused.txt', 'child')
      assert.equal(await again.files.read('/home/user/paused.txt'), 'written before pause')
      assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
    } finally {
      for (const s of made) await Sandbox.kill(s.sandboxId)
      await Sandbox.kill(sbx.sandboxId)
    }
  })

  test('getMetrics: history with start/end, other key 404', async () => {
    const sbx = await Sandbox.create('base')
    try {
      const first = await sbx.getMetrics()
      assert.ok(first.length >= 1, `no sample: ${JSON.stringify(first)}`)
      const m = first[first.length - 1]
      assert.ok(m.timestamp instanceof Date && !isNaN(m.timestamp))
      for (const k of ['cpuUsedPct', 'cpuCount', 'memUsed', 'memTotal', 'memCache', 'diskUsed', 'diskTotal']) assert.equal(typeof m[k], 'number', k)
      assert.ok(m.memTotal > 0 && m.cpuCount >= 1)
      const now = Date.now()
      assert.deepEqual(await sbx.getMetrics({ start: new Date(now + 3_600_000) }), [])
      const ranged = await Sandbox.getMetrics(sbx.sandboxId, { start: new Date(now - 60_000), end: new Date(now + 60_000) })
      assert.ok(ranged.length >= 1)
      await assert.rejects(Sandbox.getMetrics(sbx.sandboxId, { apiKey: srv.key2 }), errors.SandboxNotFoundError ?? Error)
    } finally {
      await sbx.kill()
    }
  })

  test('list filters by metadata and state', async () => {
    const a = await Sandbox.create('base', { metadata: { team: 'red', run: 'list' } })
    const b = await Sandbox.create('base', { metadata: { team: 'blue', run: 'list' } })
    try {
      await b.pause()
      const red = await Sandbox.list({ query: { metadata: { team: 'red', run: 'list' } } }).nextItems()
      assert.deepEqual(red.map((s) => s.sandboxId), [a.sandboxId])
      const paused = await Sandbox.list({ query: { state: ['paused'], metadata: { run: 'list' } } }).nextItems()
      assert.deepEqual(paused.map((s) => s.sandboxId), [b.sandboxId])
      const p = Sandbox.list({ query: { metadata: { run: 'list' } }, limit: 1 })
      const ids = []
      while (p.hasNext) ids.push(...(await p.nextItems()).map((s) => s.sandboxId))
      assert.deepEqual(ids.sort(), [a.sandboxId, b.sandboxId].sort())
    } finally {
      await a.kill()
      await Sandbox.kill(b.sandboxId)
    }
  })

  test('two API keys cannot see each other\'s sandboxes', async () => {
    const mine = await Sandbox.create('base', { apiKey: srv.key2, metadata: { owner: 'two' } })
    try {
      const seen = await Sandbox.list({ query: { metadata: { owner: 'two' } } }).nextItems()
      assert.equal(seen.length, 0, 'key one sees key two\'s sandbox')
      const own = await Sandbox.list({ apiKey: srv.key2, query: { metadata: { owner: 'two' } } }).nextItems()
      assert.equal(own.length, 1)
      await assert.rejects(Sandbox.connect(mine.sandboxId))
      assert.equal(await Sandbox.kill(mine.sandboxId), false)
      assert.equal(await mine.isRunning(), true)
    } finally {
      await mine.kill()
    }
  })

  test('cube sandbox CLI: create, exec, pause, resume, ls, kill', async () => {
    const cube = (...args) => execFileSync(path.join(process.env.CUBE_BIN, 'cube'), ['sandbox', ...args],
      { env: process.env, stdio: ['ignore', 'pipe', 'pipe'] }).toString()
    const id = cube('create', 'base', '--metadata', 'via=cli').trim()
    assert.match(id, /^[a-z0-9]+$/)
    assert.equal(cube('exec', id, 'echo', 'from', 'cli'), 'from cli\n')
    assert.throws(() => cube('exec', id, 'exit 7'), (e) => e.status === 7)
    cube('pause', id)
    assert.match(cube('ls'), new RegExp(`${id}\\s+base\\s+paused`))
    cube('resume', id)
    assert.equal(cube('exec', id, 'echo', 'back'), 'back\n')
    cube('kill', id)
    assert.doesNotMatch(cube('ls'), new RegExp(id))
  })

  test('SIGKILL of cube server: running sandboxes re-adopted, paused ones resumable', async () => {
    const run = await Sandbox.create('base', { metadata: { crash: 'run' } })
    const pau = await Sandbox.create('base', { metadata: { crash: 'pause' } })
    await run.files.write('/home/user/state.txt', 'survives')
    const bg = await run.commands.run('sleep 600', { background: true })
    await pau.files.write('/home/user/state.txt', 'paused state')
    await pau.pause()
    const keep = await run.createSnapshot({ name: 'e2e-crash' })
    // A fork in flight when the server dies: its temporary snapshot (and
    // a planted half-written one) are swept at the next start.
    const snapDir = path.join(srv.dataDir, 'gvisor', 'snapshots')
    const forking = Sandbox.fork(run.sandboxId, { count: 2 }).catch(() => 'interrupted')
    let temp = []
    for (let i = 0; i < 1000 && temp.length === 0; i++) {
      temp = fs.readdirSync(snapDir).filter((d) => d !== keep.snapshotId)
      if (temp.length === 0) await sleep(10)
    }
    assert.ok(temp.length > 0, 'the fork never took its snapshot')
    let leftover = []
    await srv.restart('SIGKILL', () => {
      fs.mkdirSync(path.join(snapDir, 'halfwritten000000000', 'image'), { recursive: true })
      leftover = fs.readdirSync(snapDir).filter((d) => d !== keep.snapshotId)
    })
    await forking
    assert.ok(leftover.includes('halfwritten000000000'))
    assert.deepEqual(fs.readdirSync(snapDir), [keep.snapshotId], 'leftover snapshots swept at start')
    const log = fs.readFileSync(path.join(srv.dataDir, 'server.log'), 'utf8')
    for (const id of leftover) assert.match(log, new RegExp(`sweep: removed leftover snapshot.*${id}`))
    // Snapshots are in the store and on disk: listed and usable after the crash.
    assert.deepEqual(await Sandbox.listSnapshots({ name: 'e2e-crash' }).nextItems(), [{ snapshotId: keep.snapshotId, names: ['e2e-crash'] }])
    const fromKeep = await Sandbox.create('e2e-crash')
    assert.equal(await fromKeep.files.read('/home/user/state.txt'), 'survives')
    assert.equal(await fromKeep.kill(), true)
    assert.equal(await Sandbox.deleteSnapshot(keep.snapshotId), true)
    const info = await Sandbox.getInfo(run.sandboxId)
    assert.equal(info.state, 'running')
    assert.equal(await run.files.read('/home/user/state.txt'), 'survives')
    assert.ok((await run.commands.list()).some((p) => p.pid === bg.pid), 'background process survives the restart')
    assert.equal((await Sandbox.getInfo(pau.sandboxId)).state, 'paused')
    const back = await Sandbox.connect(pau.sandboxId)
    assert.equal(await back.files.read('/home/user/state.txt'), 'paused state')
    assert.equal(await run.kill(), true)
    assert.equal(await back.kill(), true)
  })

  test('e2b 2.45 (v1 routes): create, commands, connect, kill', async () => {
    const sbx = await Sandbox245.create('base')
    const r = await sbx.commands.run('echo v1')
    assert.equal(r.stdout, 'v1\n')
    const again = await Sandbox245.connect(sbx.sandboxId)
    assert.equal((await again.commands.run('echo again')).stdout, 'again\n')
    assert.equal(await sbx.kill(), true)
    assert.equal(await sbx.isRunning(), false)
  })
})

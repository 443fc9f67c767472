// Starts a real `cube server` (the host's runtime: gVisor here) on a free
// loopback port with a temporary data dir, and stops it (killing every
// sandbox it made) afterwards. The stock SDKs are loaded with require() so
// that NODE_PATH (the Makefile's npm cache) applies.
import { spawn, execFileSync } from 'node:child_process'
import { createRequire } from 'node:module'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import assert from 'node:assert/strict'

export const require = createRequire(import.meta.url)

const BIN = process.env.CUBE_BIN ||= path.resolve(import.meta.dirname, '../../bin')

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
    s.on('error', reject)
  })
}

export async function startServer() {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cube-e2e-'))
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  // Own network slot names and addresses, so that this server can run next
  // to another cube (make run) on the same machine.
  const tag = Math.random().toString(36).slice(2, 7).replace(/^[0-9]/, 'x')
  const env = { ...process.env, CUBE_SLOT_PREFIX: 'e' + tag, CUBE_SLOT_HOST_RANGE: `10.${217 + (port % 8)}.${port % 256}.0/24` }
  const st = {}
  // launch starts the server and resolves with the key it prints.
  const launch = () => {
    const log = fs.openSync(path.join(dataDir, 'server.log'), 'a')
    // CUBE_E2E_SERVER_ARGS: extra flags, e.g. --network-slots.
    const extra = (process.env.CUBE_E2E_SERVER_ARGS || '').split(/\s+/).filter(Boolean)
    st.proc = spawn(path.join(BIN, 'cube'), ['--data-dir', dataDir, 'server', '--listen', `127.0.0.1:${port}`, ...extra],
      { stdio: ['ignore', 'pipe', log], env })
    st.exited = new Promise((resolve) => st.proc.on('exit', resolve))
    let out = ''
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('cube server did not start in 15 min; see ' + dataDir + '/server.log')), 900_000)
      st.proc.stdout.on('data', (d) => {
        out += d
        const m = out.match(/export E2B_API_KEY=(e2b_[0-9a-f]+)/)
        if (m) {
          clearTimeout(timer)
          resolve(m[1])
        }
      })
      st.exited.then((code) => {
        clearTimeout(timer)
        reject(new Error(`cube server exited (${code}):\n` + fs.readFileSync(path.join(dataDir, 'server.log'), 'utf8').slice(-3000)))
      })
    })
  }
  const key = await launch()
  const key2 = execFileSync(path.join(BIN, 'cube'), ['--data-dir', dataDir, 'key', 'create', '--name', 'second'], { stdio: ['ignore', 'pipe', 'ignore'] })
    .toString().trim()
  // What the user exports (recipe A of the compatibility spec).
  process.env.E2B_API_URL = url
  process.env.E2B_SANDBOX_URL = url
  process.env.E2B_API_KEY = key
  await waitHealthy(url)
  return {
    url, key, key2, dataDir,
    // restart kills the server with signal (SIGKILL: no cleanup at all)
    // and starts it again on the same data dir and port.
    // whileDown, if given, runs after the old process exited and before
    // the new one starts.
    async restart(signal = 'SIGKILL', whileDown) {
      st.proc.kill(signal)
      await st.exited
      if (whileDown) await whileDown()
      const k = await launch()
      assert.equal(k, key, 'the default key is printed again after a restart')
      await waitHealthy(url)
    },
    async stop() {
      // Kill what is left so nothing outlives the test, then stop.
      for (const k of [key, key2]) {
        try {
          const res = await fetch(url + '/v2/sandboxes?limit=100', { headers: { 'X-API-KEY': k } })
          for (const s of await res.json()) {
            await fetch(url + '/sandboxes/' + s.sandboxID, { method: 'DELETE', headers: { 'X-API-KEY': k } })
          }
        } catch { }
      }
      st.proc.kill('SIGTERM')
      await Promise.race([st.exited, new Promise((r) => setTimeout(r, 20_000))])
      if (st.proc.exitCode === null) st.proc.kill('SIGKILL')
      fs.rmSync(`/run/cube/net-${env.CUBE_SLOT_PREFIX}.lock`, { force: true }) // the slot manager's lock
      const left = leftovers(dataDir)
      if (left.length === 0 && !process.env.CUBE_E2E_KEEP) fs.rmSync(dataDir, { recursive: true, force: true })
      return left
    },
  }
}

async function waitHealthy(url) {
  for (let i = 0; i < 100; i++) {
    try {
      const r = await fetch(url + '/health')
      if (r.ok) return
    } catch { }
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error('server not healthy')
}

// Processes that still mention the data dir (runsc sandboxes) after stop.
export function leftovers(dataDir) {
  const out = []
  for (const pid of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue
    try {
      const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ')
      if (cmd.includes(dataDir)) out.push(`${pid}: ${cmd.slice(0, 200)}`)
    } catch { }
  }
  return out
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

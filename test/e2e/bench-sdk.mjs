// The stock-SDK half of `cube bench api`: at each concurrency level, n
// sandboxes, each Sandbox.create() then the first commands.run('true'),
// timed; prints one JSON line per level: {c, create: [ms], total: [ms], failed}.
// Reads E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY like any SDK user.
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const { Sandbox } = require('e2b')

const args = process.argv.slice(2)
const opt = (name, def) => {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : def
}
const template = opt('--template', 'base')
const levels = opt('-c', '1,10,50').split(',').map(Number)
const perLevel = Number(opt('-n', '20'))

async function one() {
  const t0 = performance.now()
  const sbx = await Sandbox.create(template, { timeoutMs: 120_000 })
  const created = performance.now() - t0
  try {
    await sbx.commands.run('true')
    return { create: created, total: performance.now() - t0 }
  } finally {
    await sbx.kill().catch(() => {})
  }
}

await one() // warm-up, not counted
for (const c of levels) {
  const n = Math.max(perLevel, c)
  let left = n
  const row = { c, create: [], total: [], failed: 0 }
  const worker = async () => {
    while (left > 0) {
      left--
      try {
        const s = await one()
        row.create.push(s.create)
        row.total.push(s.total)
      } catch (e) {
        row.failed++
        if (row.failed <= 3) console.error('sdk bench:', e.message)
      }
    }
  }
  await Promise.all(Array.from({ length: c }, worker))
  console.log(JSON.stringify(row))
}

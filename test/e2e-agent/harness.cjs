// Test harness for the cube-agent end-to-end tests: starts cube-agent on
// loopback and a tiny stand-in for the control plane + sandbox proxy (the
// stock SDK needs an API to create a sandbox, and with E2B_SANDBOX_URL it
// sends both envd and code-interpreter traffic to one URL, routed by the
// E2b-Sandbox-Port header — exactly what Cube's proxy does).
'use strict';
const http = require('node:http');
const net = require('node:net');
const { spawn } = require('node:child_process');

const SANDBOX_ID = 'e2eagentsbx';
const TOKEN = 'e2e-access-token';

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); });
    s.on('error', reject);
  });
}

async function waitHTTP(url, ms) {
  const end = Date.now() + ms;
  for (;;) {
    try { const r = await fetch(url); if (r.status < 500) return; } catch {}
    if (Date.now() > end) throw new Error('timeout waiting for ' + url);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function start() {
  const envdPort = await freePort();
  const interpPort = await freePort();
  const bin = process.env.CUBE_AGENT_BIN;
  if (!bin) throw new Error('CUBE_AGENT_BIN is not set');
  const agent = spawn(bin, ['--envd-addr', `127.0.0.1:${envdPort}`, '--interp-addr', `127.0.0.1:${interpPort}`,
    '--ensure-user=false', '--default-user=root', '--vsock=false', '--log-level=warn'], { stdio: ['ignore', 'inherit', 'inherit'] });
  await waitHTTP(`http://127.0.0.1:${envdPort}/health`, 15000);
  // Configure the agent as the node does after boot/restore.
  const init = await fetch(`http://127.0.0.1:${envdPort}/init`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ accessToken: TOKEN, envVars: { SANDBOX_VAR: 'from-init' }, timestamp: new Date().toISOString() }) });
  if (init.status !== 204) throw new Error('init failed: ' + init.status);
  await waitHTTP(`http://127.0.0.1:${interpPort}/health`, 15000);

  const ports = { '49983': envdPort, '49999': interpPort };
  const api = http.createServer((req, res) => {
    const sid = req.headers['e2b-sandbox-id'];
    if (sid) {
      const port = ports[req.headers['e2b-sandbox-port']];
      if (sid !== SANDBOX_ID || !port) {
        res.writeHead(502, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ sandboxId: sid, message: 'The sandbox was not found', code: 502 }));
        return;
      }
      const up = http.request({ host: '127.0.0.1', port, method: req.method, path: req.url, headers: req.headers }, (ur) => {
        res.writeHead(ur.statusCode, ur.headers);
        ur.pipe(res);
      });
      up.on('error', () => { if (!res.headersSent) res.writeHead(502); res.end(); });
      res.on('close', () => up.destroy());
      req.pipe(up);
      return;
    }
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      const json = (code, obj) => { res.writeHead(code, { 'Content-Type': 'application/json' }); res.end(obj === undefined ? '' : JSON.stringify(obj)); };
      if (req.method === 'POST' && (req.url === '/v2/sandboxes' || req.url === '/sandboxes')) {
        const tpl = JSON.parse(body || '{}').templateID || 'base';
        return json(201, { sandboxID: SANDBOX_ID, templateID: tpl, clientID: 'cube', envdVersion: '0.6.13', envdAccessToken: TOKEN, domain: null });
      }
      if (req.method === 'DELETE' && req.url.startsWith('/sandboxes/')) { res.writeHead(204); return res.end(); }
      if (req.method === 'POST' && req.url.endsWith('/timeout')) { res.writeHead(204); return res.end(); }
      json(404, { code: 404, message: 'not found in the e2e stand-in: ' + req.method + ' ' + req.url });
    });
  });
  await new Promise((r) => api.listen(0, '127.0.0.1', r));
  const apiURL = `http://127.0.0.1:${api.address().port}`;
  process.env.E2B_API_KEY = 'e2b_0123456789abcdef';
  process.env.E2B_API_URL = apiURL;
  process.env.E2B_SANDBOX_URL = apiURL;
  return {
    apiURL, envdPort, interpPort,
    async stop() {
      api.closeAllConnections?.();
      await new Promise((r) => api.close(r));
      agent.kill('SIGTERM');
      await new Promise((r) => { if (agent.exitCode !== null) r(); else agent.on('exit', r); });
    },
  };
}

module.exports = { start, SANDBOX_ID, TOKEN };

// Times new visitors from asking the broker for a session to the first output of print(1),
// with the official Jupyter JS client, as a page with live code cells runs it.
//
// Usage: node first_output.mjs <brokerUrl> <native|build> <visitors> [timeoutSeconds]
//
// Every visitor is new (no token, no cookie) and all `visitors` start at the same moment.
// One visitor:
//   native: POST {broker}/api/v1/sessions?wait=true (an agent or a page's own code);
//   build:  GET {broker}/build/gh/bench/first-output/HEAD as an EventSource reads it
//           (Accept: text/event-stream, unnamed events, closed on ready/failed), as thebe does;
// then, on the session's server through the broker, with @jupyterlab/services: the kernel
// the server already runs if it has one (a warm pool's entry), else a new one
// (KernelAPI.startNew), a KernelConnection, and requestExecute({code: 'print(1)'}); the
// clock stops at the first iopub `stream` message of that request. Then the session is
// deleted (not timed). Prints ONE JSON line to stdout:
//   {"samples_ms": [...], "errors": ["..."]}

import services from '@jupyterlab/services';
import WebSocket from 'ws';

const { KernelAPI, KernelConnection, ServerConnection } = services;

const [brokerUrl, door, visitorsArg, timeoutArg] = process.argv.slice(2);
if (!brokerUrl || !['native', 'build'].includes(door) || !visitorsArg) {
  process.stderr.write('usage: node first_output.mjs <brokerUrl> <native|build> <visitors> [timeoutSeconds]\n');
  process.exit(1);
}
const visitors = Number(visitorsArg);
const timeoutSeconds = Number(timeoutArg ?? 300);
for (const level of ['debug', 'log', 'info', 'warn']) {
  console[level] = (...args) => console.error(...args);
}
const timer = setTimeout(() => {
  process.stderr.write(`first_output: error: timed out after ${timeoutSeconds}s\n`);
  process.exit(1);
}, timeoutSeconds * 1000);

/** POST ?wait=true: {id, base_url, token} of a ready session. */
async function nativeLaunch() {
  const resp = await fetch(`${brokerUrl}/api/v1/sessions?wait=true`, { method: 'POST' });
  const body = await resp.json();
  if (resp.status !== 201 || body.status !== 'ready') {
    throw new Error(`POST /api/v1/sessions: HTTP ${resp.status} ${body.reason ?? ''} ${body.message ?? ''}`);
  }
  return { id: body.id, url: body.base_url, token: body.token };
}

/** The /build stream up to ready: {id, url, token}, as thebe takes them from the event. */
async function buildLaunch() {
  const resp = await fetch(`${brokerUrl}/build/gh/bench/first-output/HEAD`, {
    headers: { Accept: 'text/event-stream' },
  });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error('the /build stream ended before ready');
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).trimStart()).join('\n');
        if (!data) continue;
        const event = JSON.parse(data);
        const phase = String(event.phase ?? '').toLowerCase();
        if (phase === 'ready') {
          const id = event.url.replace(/\/$/, '').split('/').pop();
          return { id, url: event.url, token: event.token };
        }
        if (phase === 'failed') throw new Error(`/build failed: ${event.status_code} ${event.message}`);
      }
    }
  } finally {
    await reader.cancel().catch(() => {});
  }
}

/** One new visitor: milliseconds from its first request to the first stream output. */
async function visitor() {
  const started = performance.now();
  const session = door === 'native' ? await nativeLaunch() : await buildLaunch();
  const serverSettings = ServerConnection.makeSettings({
    baseUrl: session.url, token: session.token, appendToken: true, WebSocket, fetch, Request, Headers,
  });
  let kernel = null;
  try {
    const running = await KernelAPI.listRunning(serverSettings);
    const model = running.length ? running[0] : await KernelAPI.startNew({}, serverSettings);
    kernel = new KernelConnection({ model, serverSettings, handleComms: false });
    let firstOutput = null;
    const future = kernel.requestExecute({ code: 'print(1)' });
    future.onIOPub = (msg) => {
      if (firstOutput === null && msg.header.msg_type === 'stream') firstOutput = performance.now();
    };
    const reply = await future.done;
    if (reply.content.status !== 'ok' || firstOutput === null) {
      throw new Error(`print(1): status ${reply.content.status}, output ${firstOutput !== null}`);
    }
    return firstOutput - started;
  } finally {
    if (kernel !== null) kernel.dispose();
    await fetch(`${brokerUrl}/api/v1/sessions/${session.id}`, {
      method: 'DELETE', headers: { Authorization: `token ${session.token}` },
    }).catch(() => {});
  }
}

const outcomes = await Promise.allSettled(Array.from({ length: visitors }, () => visitor()));
const samples = outcomes.filter((o) => o.status === 'fulfilled').map((o) => o.value);
const errors = outcomes.filter((o) => o.status === 'rejected').map((o) => String(o.reason?.message ?? o.reason));
process.stdout.write(JSON.stringify({ samples_ms: samples, errors }) + '\n');
clearTimeout(timer);
process.exit(0);

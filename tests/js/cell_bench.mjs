// Times a notebook cell the way a page runs it, with the official Jupyter JS client.
//
// Usage: JUPYTER_TOKEN=... node cell_bench.mjs <baseUrl> <v1|json> <count> [maxSeconds] [timeoutSeconds]
//
// Starts a kernel on the server's REST API, connects `KernelConnection` over `ws`, waits
// for kernel_info, runs a few unmeasured cells, then times `count` cells of
// `kernel.requestExecute({code: '1'}).done`, which resolves once the shell
// execute_reply AND the iopub `status: idle` of the request have both arrived: the
// moment a notebook marks the cell finished. Stops early after `maxSeconds` of
// measuring. Shuts its kernel down and prints ONE JSON line to stdout:
//   {"protocol": <subprotocol the server chose, "" for JSON>, "offered": [...],
//    "samples_ms": [...], "warmup": n, "kernel_id": "..."}
// On any error it prints the error to stderr and exits 1.
//
// Protocols: `v1` is the client's default (it offers `v1.kernel.websocket.jupyter.org`
// and speaks binary frames when the server picks it). `json` is the legacy protocol:
// the client's public `serverSettings.WebSocket` hook gets a `ws` subclass that offers
// no subprotocol, so the server answers without one and the client sends and reads
// JSON text frames, as it does against a server that predates the v1 protocol.
// The token comes from the environment, so it never shows in a process listing.

import services from '@jupyterlab/services';
import WebSocket from 'ws';

const { KernelAPI, KernelConnection, ServerConnection } = services;

const [baseUrl, protocolArg, countArg, maxSecondsArg, timeoutArg] = process.argv.slice(2);
const token = process.env.JUPYTER_TOKEN ?? '';
if (!baseUrl || !['v1', 'json'].includes(protocolArg) || !countArg) {
  process.stderr.write(
    'usage: JUPYTER_TOKEN=... node cell_bench.mjs <baseUrl> <v1|json> <count> [maxSeconds] [timeoutSeconds]\n',
  );
  process.exit(1);
}
const count = Number(countArg);
const maxSeconds = Number(maxSecondsArg ?? 10);
const timeoutSeconds = Number(timeoutArg ?? 90);
// Unmeasured cells first: V8's JIT, the kernel's first execution and every buffer
// reach their steady state before the clock runs (a fifth, at least 3, at most 50).
const warmup = Math.min(50, Math.max(3, Math.floor(count / 5)));

// The library logs through console.debug/log (which node writes to stdout);
// keep stdout for the one JSON report.
for (const level of ['debug', 'log', 'info', 'warn']) {
  console[level] = (...args) => console.error(...args);
}

const timer = setTimeout(() => {
  process.stderr.write(`cell_bench: error: timed out after ${timeoutSeconds}s\n`);
  process.exit(1);
}, timeoutSeconds * 1000);

/** What the kernel WebSocket offered and what the server chose. */
const socket = { offered: null, protocol: null };

/** `ws` as the client gets it; for `json`, one that offers no subprotocol. */
class BenchWebSocket extends WebSocket {
  constructor(url, protocols, options) {
    const offered = protocolArg === 'json' ? [] : protocols;
    super(url, offered, options);
    socket.offered = Array.isArray(offered) ? [...offered] : offered ? [offered] : [];
    this.addEventListener('open', () => {
      socket.protocol = this.protocol;
    });
  }
}

const serverSettings = ServerConnection.makeSettings({
  baseUrl,
  token,
  appendToken: true,
  WebSocket: BenchWebSocket,
  fetch,
  Request,
  Headers,
});

/** One cell: milliseconds from requestExecute until `done`. */
async function cell(kernel) {
  const started = performance.now();
  const reply = await kernel.requestExecute({ code: '1' }).done;
  const elapsed = performance.now() - started;
  if (reply.content.status !== 'ok') {
    throw new Error(`execute_reply status ${reply.content.status}`);
  }
  return elapsed;
}

let kernel = null;
try {
  const model = await KernelAPI.startNew({}, serverSettings);
  kernel = new KernelConnection({ model, serverSettings, handleComms: false });
  await kernel.info; // kernel_info_reply over the new socket: connected and ready
  for (let i = 0; i < warmup; i++) await cell(kernel);
  const samples = [];
  const deadline = performance.now() + maxSeconds * 1000;
  while (samples.length < count && performance.now() < deadline) {
    samples.push(await cell(kernel));
  }
  const expected = protocolArg === 'json' ? '' : 'v1.kernel.websocket.jupyter.org';
  if (socket.protocol !== expected) {
    throw new Error(`the server chose subprotocol "${socket.protocol}", expected "${expected}"`);
  }
  await kernel.shutdown();
  kernel.dispose();
  process.stdout.write(JSON.stringify({
    protocol: socket.protocol,
    offered: socket.offered,
    samples_ms: samples,
    warmup,
    kernel_id: model.id,
  }) + '\n');
  clearTimeout(timer);
  process.exit(0);
} catch (err) {
  const status = err?.response?.status;
  const detail = status !== undefined ? ` (HTTP ${status} ${err.response.statusText})` : '';
  process.stderr.write(`cell_bench: error: ${err?.constructor?.name ?? 'Error'}: ${err?.message ?? err}${detail}\n`);
  if (kernel !== null) {
    try {
      await kernel.shutdown();
    } catch {
      // the server stops its kernels when the benchmark stops it
    }
  }
  process.exit(1);
}

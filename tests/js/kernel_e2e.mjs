// Drives a broker session with the official Jupyter JS client, as pages do.
//
// Usage: node kernel_e2e.mjs <baseUrl> <wsUrl> <token> [timeoutSeconds]
//
// Lists kernelspecs, starts a notebook session asking for kernel `python`
// (thebe's default name), runs `print(6*7)` and `6*7` on its kernel, reads
// the kernel model back, then shuts the session down. Prints ONE JSON line
// to stdout and exits 0; on any error prints it to stderr and exits 1.
//
// The JSON also carries what the client put on the wire, observed through
// thin wrappers around fetch and the `ws` WebSocket class (the token itself
// is never printed): for each REST call where the token was (header / query)
// and the status; for each kernel WebSocket the subprotocols offered,
// whether the URL carried `token=`, and the subprotocol the server chose.

import services from '@jupyterlab/services';
import WebSocket from 'ws';

const {
  KernelAPI, KernelManager, KernelSpecManager, ServerConnection, SessionAPI, SessionManager,
} = services;

const [baseUrl, wsUrl, token, timeoutArg] = process.argv.slice(2);
if (!baseUrl || !wsUrl || token === undefined) {
  process.stderr.write('usage: node kernel_e2e.mjs <baseUrl> <wsUrl> <token> [timeoutSeconds]\n');
  process.exit(1);
}
const timeoutSeconds = Number(timeoutArg ?? 90);

// The library logs through console.debug/log (which node writes to stdout);
// keep stdout for the one JSON report.
for (const level of ['debug', 'log', 'info', 'warn']) {
  console[level] = (...args) => console.error(...args);
}

const timer = setTimeout(() => {
  process.stderr.write(`kernel_e2e: error: timed out after ${timeoutSeconds}s\n`);
  process.exit(1);
}, timeoutSeconds * 1000);

/** What the client sent, per REST call and per WebSocket. */
const wire = { rest: [], websockets: [] };

function tokenPlacement(url, headers) {
  const where = [];
  const auth = headers.get('Authorization');
  if (auth !== null) where.push(auth === `token ${token}` ? 'header' : 'header(other)');
  if (new URL(url).searchParams.has('token')) where.push('query');
  return where;
}

async function observedFetch(request) {
  const entry = {
    method: request.method,
    path: new URL(request.url).pathname.slice(new URL(baseUrl).pathname.length),
    token: tokenPlacement(request.url, request.headers),
    // Other query keys (the library adds a cache-busting `?<timestamp>`).
    query: [...new URL(request.url).searchParams.keys()].filter((k) => k !== 'token').map(
      (k) => (/^\d+$/.test(k) ? '<timestamp>' : k),
    ),
    status: null,
  };
  wire.rest.push(entry);
  const response = await fetch(request);
  entry.status = response.status;
  return response;
}

class ObservedWebSocket extends WebSocket {
  constructor(url, protocols, options) {
    super(url, protocols, options);
    const parsed = new URL(url);
    const entry = {
      path: parsed.pathname.slice(new URL(wsUrl).pathname.length),
      offered: Array.isArray(protocols) ? [...protocols] : protocols ? [protocols] : [],
      token: parsed.searchParams.has('token')
        ? [parsed.searchParams.get('token') === token ? 'query' : 'query(other)']
        : [],
      protocol: null,
      opened: false,
    };
    wire.websockets.push(entry);
    this.addEventListener('open', () => {
      entry.opened = true;
      entry.protocol = this.protocol;
    });
  }
}

const serverSettings = ServerConnection.makeSettings({
  baseUrl,
  wsUrl,
  token,
  appendToken: true,
  WebSocket: ObservedWebSocket,
  fetch: observedFetch,
  Request,
  Headers,
});

/** Run code; collect stream text, execute_result / display_data text/plain. */
async function run(kernel, code) {
  const out = { stdout: '', stderr: '', results: [], displays: [], errors: [], iopubTypes: [] };
  const future = kernel.requestExecute({ code, stop_on_error: true });
  future.onIOPub = (msg) => {
    const type = msg.header.msg_type;
    out.iopubTypes.push(type);
    if (type === 'stream') {
      out[msg.content.name === 'stderr' ? 'stderr' : 'stdout'] += msg.content.text;
    } else if (type === 'execute_result') {
      out.results.push(msg.content.data['text/plain']);
    } else if (type === 'display_data') {
      out.displays.push(msg.content.data['text/plain']);
    } else if (type === 'error') {
      out.errors.push(`${msg.content.ename}: ${msg.content.evalue}`);
    }
  };
  // `done` resolves once both execute_reply (shell) and idle (iopub) arrived.
  const reply = await future.done;
  out.replyStatus = reply.content.status;
  future.dispose();
  return out;
}

let sessionManager;
let kernelManager;
let specManager;
try {
  specManager = new KernelSpecManager({ serverSettings });
  await specManager.ready;
  // ready/refreshSpecs() swallow failures (the manager's poll retries);
  // requestSpecs() is the one call that lets the server's refusal through.
  await specManager.requestSpecs();
  const specs = specManager.specs;
  if (!specs || Object.keys(specs.kernelspecs).length === 0) {
    throw new Error('no kernelspecs listed');
  }

  kernelManager = new KernelManager({ serverSettings });
  sessionManager = new SessionManager({ serverSettings, kernelManager });
  await sessionManager.ready;
  const session = await sessionManager.startNew({
    name: 'e2e.ipynb',
    path: 'e2e.ipynb',
    type: 'notebook',
    kernel: { name: 'python' },
  });
  const kernel = session.kernel;
  if (!kernel) throw new Error('the session has no kernel');
  const info = await kernel.info; // kernel_info_reply content, once the socket is up

  const printed = await run(kernel, 'print(6*7)');
  const expression = await run(kernel, '6*7');
  const model = await KernelAPI.getKernelModel(kernel.id, serverSettings);
  const sessionKernelName = session.model.kernel?.name ?? null;

  await session.shutdown();
  // A fresh GET api/sessions (the manager's cache would still list it).
  const remaining = (await SessionAPI.listRunning(serverSettings)).map((s) => s.id);

  sessionManager.dispose();
  kernelManager.dispose();
  specManager.dispose();

  const socket = wire.websockets.find((ws) => ws.opened) ?? null;
  const report = {
    stdout: printed.stdout,
    stderr: printed.stderr + expression.stderr,
    result: expression.results.length === 1 ? expression.results[0] : null,
    results: expression.results,
    displays: expression.displays,
    errors: [...printed.errors, ...expression.errors],
    reply_status: [printed.replyStatus, expression.replyStatus],
    iopub: { print: printed.iopubTypes, expression: expression.iopubTypes },
    kernelspecs: Object.keys(specs.kernelspecs).sort(),
    default_kernelspec: specs.default,
    kernel_name: kernel.name,
    session_kernel_name: sessionKernelName,
    kernel_model_name: model ? model.name : null,
    kernel_id: kernel.id,
    language: info.language_info?.name ?? null,
    subprotocol: socket ? socket.protocol : null,
    sessions_after_shutdown: remaining,
    wire,
  };
  process.stdout.write(JSON.stringify(report) + '\n');
  clearTimeout(timer);
  process.exit(0);
} catch (err) {
  const status = err?.response?.status;
  const detail = status !== undefined ? ` (HTTP ${status} ${err.response.statusText})` : '';
  process.stderr.write(`kernel_e2e: error: ${err?.constructor?.name ?? 'Error'}: ${err?.message ?? err}${detail}\n`);
  process.stderr.write(`kernel_e2e: wire ${JSON.stringify(wire)}\n`);
  process.exit(1);
}

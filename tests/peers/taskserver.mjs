// A non-Python peer for dispatchkit's test-suite: an HTTP callback-task server
// written with Node's built-in modules only (node >= 18, no npm packages).
//
//   node tests/peers/taskserver.mjs [--port 0] [--host 127.0.0.1]
//
// Once listening it prints one line, `LISTENING http://<host>:<port>`, to stdout.
// It exits when its stdin closes (so it never outlives the test process that
// started it) and on SIGTERM / SIGINT.
//
// Arguments: the query string (every method), merged with the body for
// POST/PUT/PATCH/DELETE (form-urlencoded UTF-8 or one JSON object; the body wins,
// repeated keys become arrays). Bodies over 1 MiB get a 413 failure envelope.
//
// Endpoints (any method):
//   /multiply          x, y -> success retval x*y (400 failure if missing/non-numeric)
//   /echo              success retval {method, path, query, body, content_type, headers, args}
//   /fail              200 failure, reason = arg reason or "boom"
//   /fail500           500 failure, reason = arg reason or "boom"
//   /status/<code>     that status, text/plain "nope <code>"; args retry_after, location
//   /invalid/empty     200, empty body          /invalid/json     200, `{not json`
//   /invalid/array     200, `[1,2]`             /invalid/nostatus 200, `{"retval":1}`
//   /invalid/unknown   200, status "pending"    /invalid/long     200, 1000 x "x"
//   /content-type      success "typed" sent with Content-Type = arg type ("" = no header)
//   /flaky             fail (default 1), code (default 503), retry_after: the first
//                      `fail` requests per Idempotency-Key answer `code` "try again";
//                      then success retval = requests seen for that key
//   /record            counts the Idempotency-Key like /flaky on arrival; after arg delay ms
//                      (default 0, cap 30000) success retval = the key
//   /seen, /seen/reset success retval {key: count} for /flaky and /record; reset clears
//   /slow              waits arg delay ms (cap 30000), then success retval = delay
//   /redirect          302 to arg `to` (default /multiply), empty body
//   /big               streams arg bytes of "x" as application/json, chunked unless length=1
//   /drop              destroys the socket without answering
//   /stats, /stats/reset  success retval {connections, requests} since start/reset
//   anything else      404 failure "unknown task: <path>"

import http from 'node:http';
import process from 'node:process';

const MAX_BODY = 1024 * 1024;
const CHUNK = Buffer.alloc(64 * 1024, 'x');
const BODY_METHODS = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

const options = { host: '127.0.0.1', port: 0 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const [flag, inline] = argv[i].split('=', 2);
  const value = inline ?? argv[++i];
  if (flag === '--port') options.port = Number(value);
  else if (flag === '--host') options.host = value;
  else {
    process.stderr.write(`taskserver: unknown option ${argv[i]}\n`);
    process.exit(2);
  }
}

const stats = { connections: 0, requests: 0 };
const seen = new Map(); // Idempotency-Key -> requests to /flaky and /record

// ---------------------------------------------------------------- helpers

class Failure extends Error {
  constructor(status, reason) {
    super(reason);
    this.status = status;
  }
}

function send(res, status, body, contentType = 'text/plain', headers = {}) {
  const data = status === 204 || status === 304 ? Buffer.alloc(0) : Buffer.from(body, 'utf8');
  const all = { ...headers };
  if (status !== 204) all['Content-Length'] = data.length;
  if (contentType) all['Content-Type'] = contentType;
  res.writeHead(status, all);
  res.end(data);
}

const sendJSON = (res, status, value, headers) =>
  send(res, status, JSON.stringify(value), 'application/json', headers);
const success = (res, retval) => sendJSON(res, 200, { status: 'success', retval });
const failure = (res, status, reason) => sendJSON(res, status, { status: 'failure', reason });

function addArg(args, key, value) {
  if (!Object.hasOwn(args, key)) args[key] = value;
  else if (Array.isArray(args[key])) args[key].push(value);
  else args[key] = [args[key], value];
}

function mediaType(req) {
  return (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
}

function parseArgs(req, query, rawBody) {
  const args = {};
  for (const [k, v] of query) addArg(args, k, v);
  if (!BODY_METHODS.has(req.method) || rawBody.length === 0) return args;
  const type = mediaType(req);
  if (type === 'application/x-www-form-urlencoded') {
    const fromBody = {};
    for (const [k, v] of new URLSearchParams(rawBody)) addArg(fromBody, k, v);
    return { ...args, ...fromBody };
  }
  if (type === 'application/json') {
    let value;
    try {
      value = JSON.parse(rawBody);
    } catch (err) {
      throw new Failure(400, `invalid JSON body: ${err.message}`);
    }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw new Failure(400, 'the JSON body must be one object');
    }
    return { ...args, ...value };
  }
  return args;
}

function numberArg(args, name, fallback) {
  const raw = args[name];
  if (raw === undefined && fallback !== undefined) return fallback;
  if (raw === undefined) throw new Failure(400, `missing argument: ${name}`);
  const value = typeof raw === 'number' || (typeof raw === 'string' && raw.trim() !== '')
    ? Number(raw) : NaN;
  if (!Number.isFinite(value)) {
    throw new Failure(400, `argument ${name} is not a number: ${JSON.stringify(raw)}`);
  }
  return value;
}

function countKey(req) {
  const key = req.headers['idempotency-key'] ?? '';
  const count = (seen.get(key) ?? 0) + 1;
  seen.set(key, count);
  return [key, count];
}

const retryAfter = (args) =>
  (args.retry_after === undefined ? {} : { 'Retry-After': String(args.retry_after) });

async function streamBig(res, total) {
  let closed = false;
  res.once('close', () => { closed = true; });
  for (let left = total; left > 0 && !closed;) {
    const piece = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left);
    left -= piece.length;
    if (!res.write(piece) && !closed) {
      await new Promise((resolve) => {
        const done = () => { res.off('drain', done); res.off('close', done); resolve(); };
        res.on('drain', done);
        res.on('close', done);
      });
    }
  }
  if (!closed) res.end();
}

// ---------------------------------------------------------------- routing

const INVALID = {
  empty: '', json: '{not json', array: '[1,2]', nostatus: '{"retval":1}',
  unknown: '{"status":"pending"}', long: 'x'.repeat(1000),
};

function handle(req, res, path, query, rawBody) {
  if (path === '/drop') return void req.socket.destroy();
  const args = parseArgs(req, query, rawBody);
  const reason = args.reason !== undefined ? String(args.reason) : 'boom';
  let m;
  switch (path) {
    case '/multiply': {
      const x = numberArg(args, 'x');
      return success(res, x * numberArg(args, 'y'));
    }
    case '/echo':
      return success(res, {
        method: req.method, path, query: [...query], body: rawBody,
        content_type: req.headers['content-type'] ?? null, headers: req.headers, args,
      });
    case '/fail': return sendJSON(res, 200, { status: 'failure', reason });
    case '/fail500': return sendJSON(res, 500, { status: 'failure', reason });
    case '/content-type': {
      const type = args.type === undefined ? 'application/json' : String(args.type);
      return send(res, 200, JSON.stringify({ status: 'success', retval: 'typed' }), type);
    }
    case '/flaky': {
      const fail = numberArg(args, 'fail', 1);
      const code = numberArg(args, 'code', 503);
      const [, count] = countKey(req);
      if (count <= fail) return send(res, code, 'try again', undefined, retryAfter(args));
      return success(res, count);
    }
    case '/record': {
      const [key] = countKey(req); // counted on arrival, answered after the optional delay
      const delay = Math.min(Math.max(numberArg(args, 'delay', 0), 0), 30000);
      if (delay === 0) return success(res, key);
      const timer = setTimeout(() => success(res, key), delay);
      res.on('close', () => clearTimeout(timer));
      return undefined;
    }
    case '/seen': return success(res, Object.fromEntries(seen));
    case '/seen/reset': seen.clear(); return success(res, {});
    case '/stats': return success(res, { ...stats });
    case '/stats/reset':
      stats.connections = 0;
      stats.requests = 0;
      return success(res, { ...stats });
    case '/slow': {
      const delay = Math.min(Math.max(numberArg(args, 'delay', 0), 0), 30000);
      const timer = setTimeout(() => success(res, delay), delay);
      res.on('close', () => clearTimeout(timer));
      return undefined;
    }
    case '/redirect':
      res.writeHead(302, { Location: String(args.to ?? '/multiply'), 'Content-Length': 0 });
      return void res.end();
    case '/big': {
      const total = Math.max(Math.floor(numberArg(args, 'bytes', 0)), 0);
      const headers = { 'Content-Type': 'application/json' };
      if (String(args.length) === '1') headers['Content-Length'] = total;
      res.writeHead(200, headers);
      return void streamBig(res, total).catch(() => res.destroy());
    }
    default:
  }
  if ((m = /^\/invalid\/(\w+)$/.exec(path)) && Object.hasOwn(INVALID, m[1])) {
    return send(res, 200, INVALID[m[1]], 'application/json');
  }
  if ((m = /^\/status\/(\d{3})$/.exec(path)) && Number(m[1]) >= 200 && Number(m[1]) <= 599) {
    const headers = retryAfter(args);
    if (args.location !== undefined) headers.Location = String(args.location);
    return send(res, Number(m[1]), `nope ${m[1]}`, undefined, headers);
  }
  return failure(res, 404, `unknown task: ${path}`);
}

// ---------------------------------------------------------------- server

const server = http.createServer((req, res) => {
  stats.requests += 1;
  req.on('error', () => res.destroy());
  res.on('error', () => {});
  const url = new URL(req.url ?? '/', 'http://peer.invalid');
  const query = new URLSearchParams(url.search);
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size <= MAX_BODY) chunks.push(chunk); // past the cap: read on, but discard
  });
  req.on('end', () => {
    if (res.headersSent || res.destroyed) return;
    if (size > MAX_BODY) return failure(res, 413, `request body over ${MAX_BODY} bytes`);
    try {
      handle(req, res, url.pathname, query, Buffer.concat(chunks).toString('utf8'));
    } catch (err) {
      if (res.headersSent) res.destroy();
      else if (err instanceof Failure) failure(res, err.status, err.message);
      else failure(res, 500, `peer error: ${err?.message ?? err}`);
    }
  });
});

server.keepAliveTimeout = 30000;
server.headersTimeout = 31000;
server.on('connection', (socket) => {
  stats.connections += 1;
  socket.on('error', () => {});
});
server.on('clientError', (err, socket) => {
  if (socket.writable && err.code !== 'ECONNRESET') {
    socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
  } else {
    socket.destroy();
  }
});

function shutdown() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}

process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
process.stdout.on('error', () => {});
process.stdin.on('end', shutdown);
process.stdin.on('close', shutdown);
process.stdin.on('error', shutdown);
process.stdin.resume();

server.on('error', (err) => {
  process.stderr.write(`taskserver: ${err.message}\n`);
  process.exit(1);
});
server.listen(options.port, options.host, () => {
  const { port } = server.address();
  const host = options.host.includes(':') ? `[${options.host}]` : options.host;
  process.stdout.write(`LISTENING http://${host}:${port}\n`);
});

// A non-Python client of dispatchkit's HTTP gateway (docs/gateway.md), written
// with Node's built-in modules only (node >= 18, no npm packages).
//
//   node tests/peers/gateway_client.mjs <base url> <task name> [key=value ...]
//
// It POSTs the key=value pairs as a form to <base url>/apply/<task name>, then
// polls <base url>/<task id>/status until the task is SUCCESS or FAILURE, giving
// up after 10 s. It prints one JSON line, {"task_id", "status", "result"}, and
// exits 0 on SUCCESS; on FAILURE it prints the line too, says why on stderr and
// exits 1; on any other error (an apply refused, a timeout) it exits 1 with a
// message on stderr and nothing on stdout.

import http from 'node:http';
import process from 'node:process';
import { setTimeout as sleep } from 'node:timers/promises';

const DEADLINE_MS = 10_000;
const POLL_MS = 20;
const REQUEST_TIMEOUT_MS = 5_000;
const READY = new Set(['SUCCESS', 'FAILURE']);

function usage(message) {
  process.stderr.write(
    `gateway_client: ${message}\n` +
      'usage: node gateway_client.mjs <base url> <task name> [key=value ...]\n',
  );
  process.exit(2);
}

const [base, name, ...pairs] = process.argv.slice(2);
if (!base || !name) usage('a base URL and a task name are required');
const form = new URLSearchParams();
for (const pair of pairs) {
  const at = pair.indexOf('=');
  if (at < 1) usage(`argument ${JSON.stringify(pair)} is not key=value`);
  form.append(pair.slice(0, at), pair.slice(at + 1));
}

// one kept-alive connection for the apply and every poll
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function request(method, url, body = null, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, agent, headers, timeout: REQUEST_TIMEOUT_MS }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('error', reject);
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        try {
          resolve({ status: res.statusCode, json: JSON.parse(text) });
        } catch {
          reject(new Error(`${method} ${url}: HTTP ${res.statusCode}, not JSON: ${text.slice(0, 200)}`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${url}: no answer in ${REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
    req.end(body);
  });
}

async function main() {
  const root = base.replace(/\/+$/, '');
  const body = form.toString();
  const applied = await request('POST', `${root}/apply/${encodeURIComponent(name)}`, body, {
    'Content-Type': 'application/x-www-form-urlencoded',
    'Content-Length': Buffer.byteLength(body),
  });
  if (applied.status !== 200 || applied.json.ok !== 'true') {
    const reason = applied.json.reason ?? JSON.stringify(applied.json);
    throw new Error(`apply refused: HTTP ${applied.status}: ${reason}`);
  }
  const taskId = applied.json.task_id;
  const deadline = Date.now() + DEADLINE_MS;
  for (;;) {
    const { status, json } = await request('GET', `${root}/${encodeURIComponent(taskId)}/status`);
    if (status !== 200 || !json.task) {
      throw new Error(`status of ${taskId}: HTTP ${status}: ${JSON.stringify(json)}`);
    }
    const task = json.task;
    if (READY.has(task.status)) {
      process.stdout.write(`${JSON.stringify({ task_id: taskId, status: task.status, result: task.result })}\n`);
      if (task.status === 'FAILURE') {
        process.stderr.write(`gateway_client: task ${taskId} FAILURE: ${task.exc}: ${task.result}\n`);
        process.exitCode = 1;
      }
      return;
    }
    if (Date.now() >= deadline) {
      throw new Error(`task ${taskId} still ${task.status} after ${DEADLINE_MS} ms`);
    }
    await sleep(POLL_MS);
  }
}

main()
  .catch((error) => {
    process.stderr.write(`gateway_client: ${error.message}\n`);
    process.exitCode = 1;
  })
  .finally(() => agent.destroy());

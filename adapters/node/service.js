#!/usr/bin/env node
// A small Node.js HTTP service that joins the mesh through the meshlib shim: the shim
// registers it in etcd under a service name, health-checks it (GET /health) and removes it
// while the check fails, so Python (or any) mesh clients call it by name:
//
//   node service.js --port 8080 --name node-orders &
//   python -m meshlib.shim --etcd 127.0.0.1:2379 --service node-orders --app-port 8080 \
//       --health-path /health                     # see docs/shim.md for every flag
//   # from Python: mesh.http_client().get("http://node-orders/orders/7")
//
// Routes: GET /health -> 200 "ok" (503 after POST /health/fail, 200 again after
// POST /health); GET /orders/<id> -> {"id", "served_by", "traceparent", "caller"};
// anything else -> 404. Prints "listening <port>" once it accepts connections.
'use strict';
const http = require('node:http');
const { parseArgs } = require('./lib/args');

const { opts } = parseArgs(process.argv.slice(2), {
  port: '0', host: '127.0.0.1', name: 'node-orders',
});
let healthy = true;
let served = 0;

function send(res, status, obj) {
  const body = Buffer.from(typeof obj === 'string' ? obj : JSON.stringify(obj));
  res.writeHead(status, {
    'Content-Type': typeof obj === 'string' ? 'text/plain' : 'application/json',
    'Content-Length': body.length,
  });
  res.end(body);
}

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    const url = new URL(req.url, 'http://localhost');
    if (url.pathname === '/health') {
      if (req.method === 'POST') healthy = true;
      return send(res, healthy ? 200 : 503, healthy ? 'ok' : 'failing');
    }
    if (url.pathname === '/health/fail' && req.method === 'POST') {
      healthy = false;
      return send(res, 200, 'now failing');
    }
    const m = /^\/orders\/([\w-]+)$/.exec(url.pathname);
    if (m) {
      served += 1;
      return send(res, 200, {
        id: m[1], served_by: opts.name, pid: process.pid, served,
        traceparent: req.headers.traceparent || null,
        caller: req.headers['x-mesh-caller'] || null,
      });
    }
    return send(res, 404, { error: `no route ${req.method} ${url.pathname}` });
  });
});
server.keepAliveTimeout = 65000;
server.listen(Number(opts.port), opts.host, () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));

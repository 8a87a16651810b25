#!/usr/bin/env node
// Call a mesh service through the meshlib shim by naming it in the Host header
// (docs/shim.md, "Outbound HTTP"): the shim resolves `Host: orders` through etcd and applies
// the service's policies (balancing, retries, deadlines, breakers), metrics and traces.
//
//   node http_host_client.js [--shim 127.0.0.1:15001] [--method GET] [--data BODY] orders /api/orders/42
//
// Prints one JSON line: {"status": 200, "headers": {...}, "body": "..."}; exits 0 on any
// HTTP response (the status tells), 1 when the shim could not be reached.
'use strict';
const http = require('node:http');
const { parseArgs, printResponse } = require('./lib/args');

const { opts, positionals } = parseArgs(process.argv.slice(2), {
  shim: process.env.MESHLIB_SHIM || '127.0.0.1:15001', method: 'GET', data: null,
});
const [service, path = '/'] = positionals;
if (!service) {
  console.error('usage: http_host_client.js [--shim HOST:PORT] [--method M] [--data BODY] SERVICE [PATH]');
  process.exit(2);
}
const [shimHost, shimPort] = opts.shim.split(':');
const body = opts.data === null ? null : Buffer.from(opts.data);
const headers = { Host: service };  // the destination is the mesh service name
if (body) headers['Content-Length'] = body.length;

const req = http.request(
  { host: shimHost, port: Number(shimPort), method: opts.method, path, headers },
  (res) => printResponse(res),
);
req.on('error', (err) => { console.error(`shim ${opts.shim}: ${err.message}`); process.exit(1); });
if (body) req.write(body);
req.end();

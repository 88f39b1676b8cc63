// A legacy Express 4 app for the differential tests: one handler for /api/transfers
// (the one a strict rule protects) and a catch-all, each answering with what Express
// made of the request. Express routes case-insensitively and ignores a trailing slash
// by default. Prints its port.
'use strict';
const express = require('express');

const app = express();
app.set('trust proxy', 'loopback'); // the gateway connects from loopback

function seen(handler) {
  return (req, res) => {
    res.json({
      handler,
      method: req.method,
      path: req.path,
      originalUrl: req.originalUrl,
      hostname: req.hostname,
      ip: req.ip,
      ips: req.ips,
      headers: req.headers,
      rawHeaders: req.rawHeaders,
    });
  };
}

app.all(['/api/transfers', '/api/transfers/*'], seen('transfers'));
app.all('*', seen('default'));

const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(`PORT ${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));

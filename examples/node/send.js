// Send one message from Node.js over the raw socket: one JSON line out, one reply line back.
// Run: FORWARDER_SOCKET=/run/turret-forwarder/forwarder.sock node send.js  (no npm packages needed)
const net = require("node:net");

const path = process.env.FORWARDER_SOCKET || "/run/turret-forwarder/forwarder.sock";
const request = { op: "set", email: "alice@example.com", attributes: { plan: "pro" } };

const sock = net.createConnection(path, () => sock.write(JSON.stringify(request) + "\n"));
sock.setEncoding("utf8");
let received = "";
sock.on("data", (chunk) => {
  received += chunk;
  if (!received.includes("\n")) return;
  const reply = JSON.parse(received.slice(0, received.indexOf("\n")));
  console.log(JSON.stringify(reply)); // {"ok":true,"id":"..."} only once the message is on disk
  process.exitCode = reply.ok ? 0 : 1;
  sock.end();
});
sock.on("error", (err) => {
  console.error(`forwarder unavailable: ${err.message}`);
  process.exitCode = 1;
});

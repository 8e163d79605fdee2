<?php
// Send one message from PHP over the raw socket: one JSON line out, one reply line back.
// Run: FORWARDER_SOCKET=/run/turret-forwarder/forwarder.sock php send.php  (no extensions needed)
$path = getenv('FORWARDER_SOCKET') ?: '/run/turret-forwarder/forwarder.sock';
$sock = @stream_socket_client("unix://$path", $errno, $errstr, 1.0);
if ($sock === false) {
    fwrite(STDERR, "forwarder unavailable: $errstr\n");
    exit(1);
}
stream_set_timeout($sock, 5);
$request = ['op' => 'set', 'email' => 'alice@example.com', 'attributes' => ['plan' => 'pro']];
fwrite($sock, json_encode($request) . "\n");
$reply = json_decode((string) fgets($sock), true);
fclose($sock);
echo json_encode($reply), "\n"; // {"ok":true,"id":"..."} only once the message is on disk
exit(($reply['ok'] ?? false) ? 0 : 1);

// Preloaded (`node --expose-gc --import ./servers/gc-hook.mjs`) into a server child of the
// sockets workload (bench/sockets.mjs), keel's and the baseline's alike, so neither server's
// own code has to know about it. Each line `gc` on stdin runs two full GCs and answers
// `{"gc":true}` on stdout; the parent then reads the child's VmRSS from /proc/<pid>/status.
// Two passes: the first can leave finalizers whose memory only the second one frees.

let pending = "";
process.stdin.setEncoding("utf8").on("data", (chunk) => {
  pending += chunk;
  let newline;
  while ((newline = pending.indexOf("\n")) >= 0) {
    const line = pending.slice(0, newline).trim();
    pending = pending.slice(newline + 1);
    if (line !== "gc") continue;
    globalThis.gc?.();
    globalThis.gc?.();
    process.stdout.write(JSON.stringify({ gc: Boolean(globalThis.gc) }) + "\n");
  }
});

// A third-party producer: celery-node submits downloads.fetch by name in task protocol 2 or 1
// and waits for the result the way its users do, by polling the Redis result backend.
// Usage: node produce.js '{"broker": ..., "backend": ..., "queue": ..., "protocol": 1,
//                          "kwargs": {...}, "args": [], "timeout_ms": 30000}'
// Prints one JSON line: {"id", "status", "result", "traceback"} of the final state.
"use strict";
const celery = require("celery-node");

async function main() {
  const job = JSON.parse(process.argv[2]);
  const client = celery.createClient(job.broker, job.backend, job.queue);
  client.conf.TASK_PROTOCOL = job.protocol;
  const result = client.sendTask("downloads.fetch", job.args || [], job.kwargs || {});
  const deadline = Date.now() + (job.timeout_ms || 30000);
  let meta = null;
  while (Date.now() < deadline) {
    meta = await client.backend.getTaskMeta(result.taskId);
    if (meta && ["SUCCESS", "FAILURE", "REVOKED"].includes(meta.status)) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const done = meta || { status: "PENDING" };
  process.stdout.write(
    JSON.stringify({
      id: result.taskId,
      status: done.status,
      result: done.result === undefined ? null : done.result,
      traceback: done.traceback || null,
    }) + "\n",
  );
  await client.disconnect();
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});

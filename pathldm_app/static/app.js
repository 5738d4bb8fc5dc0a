// Small helpers: fill the summary from a slide's summary; poll a generation job.
"use strict";

const picker = document.getElementById("slide-summary");
if (picker) {
  picker.addEventListener("change", () => {
    if (picker.value) document.getElementById("summary").value = picker.value;
  });
}

const job = document.getElementById("job");
if (job) {
  const id = job.dataset.job;
  const status = document.getElementById("status");
  const progress = document.getElementById("progress");
  const poll = async () => {
    const r = await fetch(`/api/jobs/${id}`, { cache: "no-store" });
    if (!r.ok) { status.textContent = `error ${r.status}`; return; }
    const s = await r.json();
    progress.max = 1;
    progress.value = s.fraction;
    if (s.status === "queued") {
      status.textContent = s.queue_position ? `queued (${s.queue_position} ahead)` : "queued";
    } else if (s.status === "running") {
      status.textContent = `generating: ${s.done} of ${s.total} images done ` +
        `(${Math.round(100 * s.fraction)}%)`;
    } else if (s.status === "error") {
      status.textContent = `failed: ${s.error}`;
      return;
    }
    if (s.status === "done") {
      status.textContent = `done: ${s.total} images`;
      document.getElementById("grid").src = `/generate/jobs/${id}/grid.png`;
      document.getElementById("caption").textContent = s.caption === null ? "" : String(s.caption);
      document.getElementById("result").hidden = false;
      return;
    }
    setTimeout(poll, 500);
  };
  poll();
}

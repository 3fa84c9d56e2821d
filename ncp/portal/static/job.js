/* A retrieval job's page while the job runs: polls the jobs API's progress route (same origin,
   the session's cookie) and updates the bar, the counts and the status; when the job has ended,
   the page is loaded again once, to show its studies (with their viewer links), the
   verification result and the whole history. No inline script: the CSP forbids it. */
(function () {
  "use strict";
  var box = document.getElementById("job");
  if (!box || box.getAttribute("data-ended") === "true") return;
  var id = box.getAttribute("data-job");
  var messages = JSON.parse(document.getElementById("job-messages").textContent);
  var statusEl = document.getElementById("job-status");
  var reasonEl = document.getElementById("job-reason");
  var bar = document.getElementById("job-progress");
  var counts = document.getElementById("job-counts");
  var ENDED = ["stored", "failed", "declined", "cancelled", "purged"];
  var lastStatus = statusEl.className;
  var failures = 0;

  function msg(key, values) {
    var text = Object.prototype.hasOwnProperty.call(messages, key) ? messages[key] : key;
    Object.keys(values || {}).forEach(function (name) {
      text = text.split("{" + name + "}").join(String(values[name]));
    });
    return text;
  }
  function size(bytes) {
    if (bytes >= 1e9) return (bytes / 1e9).toFixed(1) + " GB";
    if (bytes >= 1e6) return (bytes / 1e6).toFixed(1) + " MB";
    return Math.round(bytes / 1e3) + " kB";
  }

  function poll() {
    fetch("/api/retrieval/jobs/" + encodeURIComponent(id) + "/progress", {
      credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store"
    }).then(function (answer) {
      if (!answer.ok) throw new Error(String(answer.status));
      return answer.json();
    }).then(function (job) {
      failures = 0;
      var p = job.progress;
      var percent = p.instances_total ? Math.round(100 * p.instances_done / p.instances_total) : 0;
      bar.value = percent;
      bar.textContent = percent + "%";
      counts.textContent = msg("job.counts", { done: p.instances_done, total: p.instances_total, size: size(p.bytes_done) });
      var cls = "status job-" + job.status;
      if (cls !== lastStatus) {
        lastStatus = cls;
        statusEl.className = cls;
        statusEl.textContent = msg("job.status." + job.status);
      }
      reasonEl.textContent = job.reason || "";
      if (ENDED.indexOf(job.status) >= 0 || job.status === "needs-hp") {
        window.location.reload();
        return;
      }
      setTimeout(poll, 1000);
    }).catch(function () {
      failures += 1;
      setTimeout(poll, Math.min(10000, 1000 * Math.pow(2, failures)));
    });
  }
  setTimeout(poll, 500);
})();

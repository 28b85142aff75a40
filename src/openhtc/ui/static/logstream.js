// The job page's log, followed through Server-Sent Events (ui/live.py). Lines are added as
// text, never as HTML. Without EventSource the page keeps its polled fragment (htmx).
(function () {
  "use strict";
  if (!window.EventSource) return;
  document.querySelectorAll("[data-log-stream]").forEach(function (box) {
    var poll = box.querySelector(".log-poll");
    if (poll) poll.remove();
    var source = new EventSource(box.getAttribute("data-log-stream"));
    function add(className, time, text) {
      var row = document.createElement("div");
      row.className = className;
      if (time) {
        var stamp = document.createElement("time");
        stamp.textContent = time;
        row.appendChild(stamp);
        row.appendChild(document.createTextNode(" "));
      }
      row.appendChild(document.createTextNode(text));
      var atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
      box.appendChild(row);
      if (atBottom) box.scrollTop = box.scrollHeight;
    }
    source.addEventListener("line", function (event) {
      var line = JSON.parse(event.data);
      add("line", line.timestamp, line.message);
    });
    source.addEventListener("end", function () {
      source.close();
      add("tail end", "", "End of log.");
    });
  });
})();

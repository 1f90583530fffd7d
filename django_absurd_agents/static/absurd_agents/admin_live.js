/* Live pages of the Absurd admin: regions re-read from the page's own URL and swapped in place.
 *
 * Plain JavaScript, no build step, nothing fetched from elsewhere. An element marked
 * [data-live-refresh="5"] (with an id) is re-read every 5 seconds: the page's own URL is fetched again
 * (the same view, so the same permission check), and the region's content is replaced by the element
 * of the same id in the fetched page. One fetch serves every region of the page, at the shortest
 * interval asked for. Nothing is fetched while the tab is hidden. A region carrying data-live-final (a
 * task that is over) stops the refresh. A 403, a 404 or a redirect (to the login page) stops it too,
 * and the page says so in its [data-live-status] element. A task's event log is admin_events.js.
 */
(function () {
  "use strict";

  var HEADER = "X-Absurd-Live";

  function clock() {
    return new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function Refresher(regions, status) {
    this.regions = regions;
    this.status = status;
    this.seconds = Math.min.apply(null, regions.map(function (region) {
      return Math.max(1, Number(region.getAttribute("data-live-refresh")) || 5);
    }));
    this.timer = null;
    this.busy = false;
    this.stopped = false;
  }

  Refresher.prototype.say = function (text, state) {
    if (!this.status) { return; }
    this.status.textContent = text;
    this.status.setAttribute("data-live-state", state);
  };

  Refresher.prototype.stop = function (text, state) {
    this.stopped = true;
    window.clearTimeout(this.timer);
    this.say(text, state || "stopped");
  };

  Refresher.prototype.final = function () {
    return this.regions.some(function (region) { return region.hasAttribute("data-live-final"); });
  };

  Refresher.prototype.schedule = function () {
    var self = this;
    window.clearTimeout(this.timer);
    if (!this.stopped) { this.timer = window.setTimeout(function () { self.tick(); }, this.seconds * 1000); }
  };

  Refresher.prototype.tick = function () {
    var self = this;
    if (this.stopped || this.busy) { return; }
    if (document.hidden) {
      this.say("live \u00b7 paused while the tab is hidden", "paused");
      return;  // the visibilitychange listener starts again
    }
    this.busy = true;
    var headers = { Accept: "text/html" };
    headers[HEADER] = "refresh";  // the view can tell a refresh from a visit
    fetch(window.location.href, {
      headers: headers,
      credentials: "same-origin",
      cache: "no-store",
      redirect: "manual"
    }).then(function (response) {
      if (response.type === "opaqueredirect" || (response.status >= 300 && response.status < 400)) {
        self.stop("stopped: you were logged out; reload the page to log in again");
      } else if (response.status === 403) {
        self.stop("stopped: you may no longer view this page (403)");
      } else if (response.status === 404) {
        self.stop("stopped: this page is gone (404)");
      } else if (!response.ok) {
        self.say("update failed (HTTP " + response.status + "), trying again", "error");
      } else {
        return response.text().then(function (html) { self.swap(html); });
      }
    }).catch(function () {
      self.say("update failed (the server did not answer), trying again", "error");
    }).then(function () {
      self.busy = false;
      self.schedule();
    });
  };

  Refresher.prototype.swap = function (html) {
    var fetched = new DOMParser().parseFromString(html, "text/html");
    this.regions.forEach(function (region) {
      var fresh = fetched.getElementById(region.id);
      if (!fresh) { return; }
      var open = [];
      region.querySelectorAll("details").forEach(function (details, index) { if (details.open) { open.push(index); } });
      region.innerHTML = fresh.innerHTML;
      var all = region.querySelectorAll("details");
      open.forEach(function (index) { if (all[index]) { all[index].open = true; } });
      if (fresh.hasAttribute("data-live-final")) { region.setAttribute("data-live-final", ""); }
    });
    if (this.final()) {
      this.stop("updated " + clock() + " \u00b7 the task is over, no more updates", "done");
    } else {
      this.say("live \u00b7 updated " + clock(), "live");
    }
  };

  Refresher.prototype.start = function () {
    var self = this;
    if (this.final()) {
      this.stop("the task is over; this page no longer changes", "done");
      return;
    }
    this.say("live \u00b7 updated " + clock() + " \u00b7 every " + this.seconds + " s", "live");
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && !self.stopped) { self.tick(); }
    });
    this.schedule();
  };

  function start() {
    var regions = Array.prototype.filter.call(
      document.querySelectorAll("[data-live-refresh]"), function (region) { return region.id; }
    );
    if (regions.length) {
      new Refresher(regions, document.querySelector("[data-live-status]")).start();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());

// The little glue the console needs beyond htmx: toasts from HX-Trigger and request errors.
(function () {
  "use strict";

  function toast(message, level) {
    var box = document.getElementById("toasts");
    if (!box || !message) return;
    var el = document.createElement("div");
    el.className = "toast toast-" + (level || "success");
    el.setAttribute("role", level === "error" ? "alert" : "status");
    el.textContent = message; // never innerHTML: messages may echo user input
    box.appendChild(el);
    setTimeout(function () { el.classList.add("toast-leaving"); }, 4000);
    setTimeout(function () { el.remove(); }, 4400);
  }

  document.body.addEventListener("toast", function (evt) {
    var d = evt.detail || {};
    toast(d.message, d.level);
  });

  // CSRF: every htmx request carries this browser's token (forms also have it as a field,
  // for when JavaScript is off). Read at send time: a swapped-in page may bring a new one.
  document.body.addEventListener("htmx:configRequest", function (evt) {
    var meta = document.querySelector('meta[name="csrf-token"]');
    if (meta) evt.detail.headers["X-CSRF-Token"] = meta.getAttribute("content");
  });

  document.body.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail.xhr;
    toast("Request failed (" + xhr.status + " " + (xhr.statusText || "error") + ")", "error");
  });

  document.body.addEventListener("htmx:sendError", function () {
    toast("Cannot reach the control plane. Is it running?", "error");
  });

  var flash = document.querySelector(".flash");
  if (flash) setTimeout(function () { flash.classList.add("flash-fade"); }, 5000);
})();

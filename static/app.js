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

// The canary control: preset buttons move the slider; the slider shows its value and the
// split it would apply. Delegated, so it keeps working after htmx swaps the section.
(function () {
  "use strict";

  function showShare(slider) {
    var form = slider.form;
    if (!form) return;
    var share = parseInt(slider.value, 10) || 0;
    var out = form.querySelector("output[for='" + slider.id + "']");
    if (out) out.textContent = share + " %";
    var cand = form.querySelector("[data-role='candidate-share']");
    var base = form.querySelector("[data-role='baseline-share']");
    if (cand) cand.textContent = String(share);
    if (base) base.textContent = String(100 - share);
    form.querySelectorAll("[data-share]").forEach(function (btn) {
      btn.setAttribute("aria-pressed", btn.getAttribute("data-share") === String(share) ? "true" : "false");
    });
  }

  document.addEventListener("click", function (evt) {
    var btn = evt.target.closest && evt.target.closest("button[data-share]");
    if (!btn || !btn.form) return;
    var slider = btn.form.querySelector("input[type='range'][name='share']");
    if (!slider) return;
    slider.value = btn.getAttribute("data-share");
    showShare(slider);
  });

  document.addEventListener("input", function (evt) {
    var el = evt.target;
    if (el && el.matches && el.matches("input[type='range'][name='share']")) showShare(el);
  });
})();

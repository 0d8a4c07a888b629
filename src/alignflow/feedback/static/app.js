// Keyboard-first annotation: no inline script (the Content-Security-Policy forbids it), no build step.
(function () {
  "use strict";
  var form = document.getElementById("answer");
  if (!form) return;
  var started = performance.now();
  var questions = Array.prototype.slice.call(form.querySelectorAll("fieldset.question"));
  var current = 0;

  function visible(q) { return !q.classList.contains("hidden"); }
  function highlight() {
    questions.forEach(function (q, i) { q.classList.toggle("current", i === current); });
  }
  function move(step) {
    var i = current;
    do { i += step; } while (i >= 0 && i < questions.length && !visible(questions[i]));
    if (i >= 0 && i < questions.length) current = i;
    highlight();
  }
  function syncStrength() {
    // A tie has no strength: hide the question so the keyboard flow skips it.
    var tie = form.querySelector("input[name=choice][value=tie]");
    var strength = form.querySelector("fieldset[data-question=strength]");
    if (!strength) return;
    var isTie = !!(tie && tie.checked);
    strength.classList.toggle("hidden", isTie);
    if (isTie) strength.querySelectorAll("input").forEach(function (r) { r.checked = false; });
  }
  function answer(n) {
    var q = questions[current];
    if (!q) return;
    if (q.dataset.ranking) {
      var view = q.querySelector("input[name=ranking]");
      var k = parseInt(q.dataset.ranking, 10);
      var picked = view.value ? view.value.split(",") : [];
      if (n >= 1 && n <= k && picked.indexOf(String(n - 1)) < 0) picked.push(String(n - 1));
      view.value = picked.join(",");
      if (picked.length === k) move(1);
      return;
    }
    var radios = q.querySelectorAll("input[type=radio]");
    if (n >= 1 && n <= radios.length) {
      radios[n - 1].checked = true;
      syncStrength();
      move(1);
    }
  }
  function submit() {
    form.querySelector("input[name=duration_s]").value = ((performance.now() - started) / 1000).toFixed(3);
    if (form.requestSubmit) form.requestSubmit(); else form.submit();
  }
  form.addEventListener("submit", function () {
    form.querySelector("input[name=duration_s]").value = ((performance.now() - started) / 1000).toFixed(3);
  });
  form.addEventListener("change", syncStrength);
  questions.forEach(function (q, i) {
    q.addEventListener("click", function () { current = i; highlight(); });
  });
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    var typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type === "text") || t.tagName === "SELECT");
    if (typing) {
      if (e.key === "Escape") t.blur();
      else if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && form.contains(t)) { e.preventDefault(); submit(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (/^[1-9]$/.test(e.key)) { e.preventDefault(); answer(parseInt(e.key, 10)); }
    else if (e.key === "j" || e.key === "ArrowDown") { e.preventDefault(); move(1); }
    else if (e.key === "k" || e.key === "ArrowUp") { e.preventDefault(); move(-1); }
    else if (e.key === "r") { e.preventDefault(); form.querySelector("textarea[name=rationale]").focus(); }
    else if (e.key === "g") { var g = document.getElementById("guideline"); if (g) g.open = !g.open; }
    else if (e.key === "x") { var s = document.querySelector("#skip input[name=reason]"); if (s) { e.preventDefault(); s.focus(); } }
    else if (e.key === "a") { var acc = document.getElementById("accept"); if (acc) { e.preventDefault(); acc.submit(); } }
    else if (e.key === "Backspace") {
      var rk = form.querySelector("input[name=ranking]");
      if (rk) { e.preventDefault(); rk.value = rk.value.split(",").slice(0, -1).join(","); }
    }
    else if (e.key === "Enter") { e.preventDefault(); submit(); }
  });
  highlight();
})();

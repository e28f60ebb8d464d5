// Boundless console: the little behaviour the pages need, without inline scripts (the CSP forbids them).
document.addEventListener("click", function (event) {
  var copy = event.target.closest("[data-copy]");
  if (copy) {
    var source = document.getElementById(copy.getAttribute("data-copy"));
    var text = source ? source.textContent.trim() : "";
    var done = function () {
      var note = document.getElementById(copy.getAttribute("data-copy") + "-copied");
      if (note) { note.hidden = false; }
      copy.textContent = "Copied";
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectText(source); });
    } else {
      selectText(source);
      try { if (document.execCommand("copy")) { done(); } } catch (e) { /* the text stays selected */ }
    }
    return;
  }
  var confirmable = event.target.closest("[data-confirm]");
  if (confirmable && !window.confirm(confirmable.getAttribute("data-confirm"))) {
    event.preventDefault();
  }
});

function selectText(node) {
  if (!node) { return; }
  var range = document.createRange();
  range.selectNodeContents(node);
  var selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

// Keys of the labelling pages: 1 / 2 / t / s choose (the form is posted, the next one comes back at once), u undoes;
// on a thumbs page 1 is good and 2 bad.
document.addEventListener("keydown", function (event) {
  if (event.target && (event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  var ids = { "1": ["choice-left", "choice-up"], "2": ["choice-right", "choice-down"], "t": ["choice-tie"], "s": ["choice-skip"], "u": ["undo"] };
  var button = null;
  (ids[event.key.toLowerCase()] || []).forEach(function (id) { button = button || document.getElementById(id); });
  if (button) { event.preventDefault(); button.click(); }
});

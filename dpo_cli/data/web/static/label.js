// Keys of the labelling page: 1 / 2 / t / s choose (the form is posted, the next pair comes back at once), u undoes.
document.addEventListener("keydown", function (event) {
  if (event.target && (event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  var ids = { "1": "choice-left", "2": "choice-right", "t": "choice-tie", "s": "choice-skip", "u": "undo" };
  var button = document.getElementById(ids[event.key.toLowerCase()]);
  if (button) { event.preventDefault(); button.click(); }
});

// Small helpers of the console's pages (no inline scripts: the CSP forbids them).
// A range input and a number input with the same data-pair mirror each other.
document.addEventListener("input", (e) => {
  const pair = e.target.dataset && e.target.dataset.pair;
  if (!pair) return;
  document.querySelectorAll(`[data-pair="${pair}"]`).forEach((el) => {
    if (el !== e.target) el.value = e.target.value;
  });
});
// A form with data-confirm asks before it submits.
document.addEventListener("submit", (e) => {
  const msg = e.target.dataset && e.target.dataset.confirm;
  if (msg && !window.confirm(msg)) e.preventDefault();
});

/* Hand-drawn SVG charts: each trial's metric against its index, with the FP32 baseline and the goal line; and,
   where trials carry deployment figures, metric against latency (size as the marker) with the Pareto set.
   No library: the page must work with nothing fetched from the internet. */
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = { passed: "#1d8a4e", failed_goal: "#c77700", error: "#c23030", running: "#2160c4" };

function goalLine(task) {
  const g = task.goal, b = task.baseline;
  if (b === null || b === undefined || !g) return null;
  const sign = g.higher_is_better ? -1 : 1;
  return g.criterion === "relative" ? b * (1 + sign * g.tolerable_loss) : b + sign * g.tolerable_loss;
}

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawChart(svg, task) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = svg.clientWidth || 800, H = svg.clientHeight || 260, L = 60, R = 130, T = 14, B = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const trials = task.trials || [];
  const points = trials.filter(t => t.metric !== null && t.metric !== undefined && isFinite(t.metric));
  const goal = goalLine(task);
  const values = points.map(t => t.metric).concat([task.baseline, goal].filter(v => v !== null && v !== undefined));
  if (!values.length) {
    svg.appendChild(el("text", { x: L, y: H / 2 }, "no metrics yet"));
    return;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const n = Math.max(trials.length, 1);
  const x = i => L + (n === 1 ? (W - L - R) / 2 : (i / (n - 1)) * (W - L - R));
  const y = v => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  svg.appendChild(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee4" }));
  svg.appendChild(el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dee4" }));
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    svg.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toPrecision(4)));
  }
  svg.appendChild(el("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle" }, "trial"));
  const hline = (v, color, label, id, nudge) => {
    if (v === null || v === undefined) return;
    svg.appendChild(el("line", { id, x1: L, y1: y(v), x2: W - R, y2: y(v), stroke: color, "stroke-dasharray": "5 4" }));
    svg.appendChild(el("text", { x: W - R + 6, y: y(v) + 4 + nudge, style: `fill:${color}` }, `${label} ${v.toPrecision(4)}`));
  };
  // Baseline and goal are often a hair apart: keep their labels from overlapping.
  const apart = goal === null || task.baseline === null ? 99 : Math.abs(y(goal) - y(task.baseline));
  const nudge = apart < 13 ? (13 - apart) / 2 : 0;
  const goalBelow = goal !== null && task.baseline !== null && y(goal) >= y(task.baseline);
  hline(task.baseline, "#2160c4", "baseline", "baseline-line", goalBelow ? -nudge : nudge);
  hline(goal, "#c23030", "goal", "goal-line", goalBelow ? nudge : -nudge);
  for (const t of trials) {
    if (n <= 20 || t.index % Math.ceil(n / 20) === 0) {
      svg.appendChild(el("text", { x: x(t.index), y: H - B + 13, "text-anchor": "middle" }, String(t.index)));
    }
  }
  const line = points.map((t, k) => `${k ? "L" : "M"}${x(t.index).toFixed(1)},${y(t.metric).toFixed(1)}`).join("");
  if (points.length > 1) svg.appendChild(el("path", { d: line, fill: "none", stroke: "#b5bcc6" }));
  for (const t of points) {
    const winner = task.winner && task.winner.index === t.index;
    const dot = el("circle", { cx: x(t.index), cy: y(t.metric), r: winner ? 6 : 4, fill: COLORS[t.state] || "#6b7480",
                               class: "point", "data-index": t.index });
    if (winner) { dot.setAttribute("stroke", "#1d232b"); dot.setAttribute("stroke-width", "2"); }
    dot.appendChild(el("title", {}, `trial ${t.index} ${t.label}: ${t.metric}`));
    svg.appendChild(dot);
  }
}

/* Trials with a metric and a latency that no other beats on both (higher-is-better metrics flipped), by latency. */
function paretoFront(task) {
  const sign = task.goal && task.goal.higher_is_better === false ? -1 : 1;
  const pts = (task.trials || []).filter(t => t.deploy && t.metric !== null && t.metric !== undefined && isFinite(t.metric));
  return pts.filter(p => !pts.some(q => sign * q.metric >= sign * p.metric && q.deploy.latency_ms <= p.deploy.latency_ms
                                        && (sign * q.metric > sign * p.metric || q.deploy.latency_ms < p.deploy.latency_ms)))
            .sort((a, b) => a.deploy.latency_ms - b.deploy.latency_ms);
}

function drawTradeoff(svg, task) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = svg.clientWidth || 800, H = svg.clientHeight || 260, L = 60, R = 130, T = 14, B = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pts = (task.trials || []).filter(t => t.deploy && t.metric !== null && t.metric !== undefined && isFinite(t.metric));
  const fp32 = fastest(task.baseline_figures);
  const xs = pts.map(t => t.deploy.latency_ms).concat(fp32 ? [fp32.p50_ms] : []);
  const ys = pts.map(t => t.metric).concat(fp32 && task.baseline !== null ? [task.baseline] : []);
  if (!xs.length) { svg.appendChild(el("text", { x: L, y: H / 2 }, "no figures yet")); return; }
  let x0 = 0, x1 = Math.max(...xs) * 1.1, y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.1; y0 -= pad; y1 += pad;
  const x = v => L + ((v - x0) / (x1 - x0)) * (W - L - R), y = v => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee4" }));
  svg.appendChild(el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dee4" }));
  for (const v of [x1 / 1.1 / 2, x1 / 1.1]) svg.appendChild(el("text", { x: x(v), y: H - B + 13, "text-anchor": "middle" }, `${v.toPrecision(3)} ms`));
  for (const v of [y0 + pad, y1 - pad]) svg.appendChild(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toPrecision(4)));
  svg.appendChild(el("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle" }, "metric against latency per batch (p50); marker area: size on disk; green line: the Pareto set"));
  const front = paretoFront(task);
  if (front.length > 1) {
    const d = front.map((t, k) => `${k ? "L" : "M"}${x(t.deploy.latency_ms).toFixed(1)},${y(t.metric).toFixed(1)}`).join("");
    svg.appendChild(el("path", { id: "pareto-line", d, fill: "none", stroke: "#1d8a4e", "stroke-width": "2" }));
  }
  const sizes = pts.map(t => t.deploy.size_bytes || 0).concat(task.baseline_figures ? [task.baseline_figures.size_bytes || 0] : []);
  const big = Math.max(1, ...sizes), radius = s => 3 + 9 * Math.sqrt((s || 0) / big);
  if (fp32 && task.baseline !== null) {
    const b = el("rect", { id: "fp32-point", x: x(fp32.p50_ms) - 5, y: y(task.baseline) - 5, width: 10, height: 10, fill: "#2160c4" });
    b.appendChild(el("title", {}, `FP32 (${fp32.form}): ${fp32.p50_ms.toPrecision(3)} ms, ${bytes(task.baseline_figures.size_bytes)}`));
    svg.appendChild(b);
    svg.appendChild(el("text", { x: x(fp32.p50_ms) + 8, y: y(task.baseline) + 4 }, "FP32"));
  }
  const onFront = new Set(front.map(t => t.index));
  for (const t of pts) {
    const winner = task.winner && task.winner.index === t.index;
    const dot = el("circle", { cx: x(t.deploy.latency_ms), cy: y(t.metric), r: radius(t.deploy.size_bytes),
                               fill: COLORS[t.state] || "#6b7480", "fill-opacity": "0.7",
                               class: onFront.has(t.index) ? "tradeoff pareto" : "tradeoff", "data-index": t.index });
    if (winner) { dot.setAttribute("stroke", "#1d232b"); dot.setAttribute("stroke-width", "2"); }
    dot.appendChild(el("title", {}, `trial ${t.index} ${t.label}: ${t.metric}, ${t.deploy.latency_ms.toPrecision(3)} ms` +
                                    `${t.deploy.speedup ? ` (${t.deploy.speedup.toFixed(2)}× FP32)` : ""}, ${bytes(t.deploy.size_bytes)}`));
    svg.appendChild(dot);
  }
}

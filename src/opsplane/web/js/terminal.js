/* Output rendering: ANSI colours become classes, other escape sequences are dropped, and
 * every byte of host output reaches the page as text.
 */

import { MAX_LINES } from "./config.js";
import { $, h } from "./dom.js";

const ANSI_CSI = /\x1b\[([0-9;:?<>=]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[PX^_][^\x1b]*\x1b\\|\x1b[ -/]*[0-~]|\r\n|\n|\r|[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]/g;
const ANSI_INCOMPLETE = /\x1b(?:\[[0-9;:?<>=]*[ -/]*|\][^\x07\x1b]*|[PX^_][^\x1b]*|[ -/]*)?$/;

function xterm256(n) {
  if (n < 16) return null;
  if (n >= 232) {
    const v = 8 + (n - 232) * 10;
    return `rgb(${v},${v},${v})`;
  }
  const i = n - 16;
  const c = (x) => (x === 0 ? 0 : 55 + x * 40);
  return `rgb(${c(Math.floor(i / 36))},${c(Math.floor(i / 6) % 6)},${c(i % 6)})`;
}

class Sgr {
  constructor() { this.reset(); }
  reset() {
    this.fg = null; this.bg = null; this.fgRgb = null; this.bgRgb = null;
    this.bold = false; this.dim = false; this.italic = false; this.underline = false; this.inverse = false;
  }
  apply(paramText) {
    const params = paramText === "" ? [0] : paramText.split(/[;:]/).map((x) => (x === "" ? 0 : Number(x)));
    for (let i = 0; i < params.length; i++) {
      const p = params[i];
      if (p === 0) this.reset();
      else if (p === 1) this.bold = true;
      else if (p === 2) this.dim = true;
      else if (p === 3) this.italic = true;
      else if (p === 4) this.underline = true;
      else if (p === 7) this.inverse = true;
      else if (p === 22) { this.bold = false; this.dim = false; }
      else if (p === 23) this.italic = false;
      else if (p === 24) this.underline = false;
      else if (p === 27) this.inverse = false;
      else if (p >= 30 && p <= 37) { this.fg = p - 30; this.fgRgb = null; }
      else if (p >= 90 && p <= 97) { this.fg = p - 90 + 8; this.fgRgb = null; }
      else if (p === 39) { this.fg = null; this.fgRgb = null; }
      else if (p >= 40 && p <= 47) { this.bg = p - 40; this.bgRgb = null; }
      else if (p >= 100 && p <= 107) { this.bg = p - 100 + 8; this.bgRgb = null; }
      else if (p === 49) { this.bg = null; this.bgRgb = null; }
      else if (p === 38 || p === 48) {
        let color = null; let index = null;
        if (params[i + 1] === 5) {
          const n = params[i + 2] ?? 0;
          if (n < 16) index = n; else color = xterm256(n);
          i += 2;
        } else if (params[i + 1] === 2) {
          color = `rgb(${params[i + 2] & 255},${params[i + 3] & 255},${params[i + 4] & 255})`;
          i += 4;
        }
        if (p === 38) { this.fg = index; this.fgRgb = color; } else { this.bg = index; this.bgRgb = color; }
      }
    }
  }
  key() {
    return `${this.fg}|${this.bg}|${this.fgRgb}|${this.bgRgb}|${+this.bold}${+this.dim}${+this.italic}${+this.underline}${+this.inverse}`;
  }
  isPlain() {
    return this.fg === null && this.bg === null && !this.fgRgb && !this.bgRgb && !this.bold && !this.dim && !this.italic && !this.underline && !this.inverse;
  }
  span(text) {
    const classes = [];
    let fg = this.fg; let bg = this.bg; let fgRgb = this.fgRgb; let bgRgb = this.bgRgb;
    if (this.inverse) { [fg, bg] = [bg, fg]; [fgRgb, bgRgb] = [bgRgb, fgRgb]; classes.push("a-inv"); }
    if (fg !== null) classes.push(`a-f${fg}`);
    if (bg !== null) classes.push(`a-b${bg}`);
    if (this.bold) classes.push("a-bold");
    if (this.dim) classes.push("a-dim");
    if (this.italic) classes.push("a-it");
    if (this.underline) classes.push("a-ul");
    const el = h("span", { class: classes.join(" ") || undefined }, text);
    if (fgRgb) el.style.color = fgRgb;
    if (bgRgb) el.style.backgroundColor = bgRgb;
    return el;
  }
}

/** Writes one stream (stdout or stderr) of one run into the shared terminal. */
class StreamWriter {
  constructor(term, run, stream) {
    this.term = term;
    this.run = run;
    this.stream = stream;
    this.sgr = new Sgr();
    this.carry = "";
    this.line = null;
    this.tail = null;
    this.tailKey = "";
    this.cr = false;
  }

  write(chunk) {
    let text = this.carry + chunk;
    this.carry = "";
    const incomplete = ANSI_INCOMPLETE.exec(text);
    if (incomplete && incomplete[0].length && incomplete[0].length < 512) {
      this.carry = incomplete[0];
      text = text.slice(0, incomplete.index);
    }
    ANSI_CSI.lastIndex = 0;
    let at = 0;
    let m;
    while ((m = ANSI_CSI.exec(text)) !== null) {
      if (m.index > at) this.text(text.slice(at, m.index));
      at = ANSI_CSI.lastIndex;
      const token = m[0];
      if (token === "\n" || token === "\r\n") this.newline();
      else if (token === "\r") this.cr = true;
      else if (m[2] === "m") this.sgr.apply(m[1] || "");
    }
    if (at < text.length) this.text(text.slice(at));
  }

  text(segment) {
    if (!segment) return;
    if (!this.line) this.line = this.term.newLine(this.run, this.stream);
    if (this.cr) {
      // A carriage return redraws the line (progress bars): keep only the host prefix.
      this.cr = false;
      while (this.line.childNodes.length > 1) this.line.lastChild.remove();
      this.tail = null;
    }
    const key = this.sgr.key();
    if (this.tail && this.tailKey === key) {
      this.tail.textContent += segment;
    } else {
      this.tail = this.sgr.isPlain() ? h("span", null, segment) : this.sgr.span(segment);
      this.tailKey = key;
      this.line.append(this.tail);
    }
  }

  newline() {
    if (!this.line) this.line = this.term.newLine(this.run, this.stream);
    this.line = null;
    this.tail = null;
    this.cr = false;
  }
}

function hostColor(name) {
  let hash = 0;
  for (let i = 0; i < name.length; i++) hash = (hash * 31 + name.charCodeAt(i)) | 0;
  return Math.abs(hash) % 8;
}

/** The output panel: one terminal for all hosts, focusable on one host. */
export class Terminal {
  constructor(el) {
    this.el = el;
    this.writers = new Map();
    this.lines = 0;
    this.focusRun = "";
    this.stick = true;
    this.scrollQueued = false;
    this.prefixWidth = 0;
    this.trimmed = false;
    this.onTrim = null;
    el.replaceChildren();
    el.classList.remove("focus");
  }

  write(run, stream, data) {
    const key = `${run.id}\n${stream}`;
    let writer = this.writers.get(key);
    if (!writer) {
      writer = new StreamWriter(this, run, stream);
      this.writers.set(key, writer);
    }
    writer.write(data);
    this.queueScroll();
  }

  newLine(run, stream) {
    if (run.host.length > this.prefixWidth) {
      this.prefixWidth = Math.min(run.host.length, 28);
      this.el.style.setProperty("--pfx", `${this.prefixWidth + 1}ch`);
    }
    const line = h("div", { class: `ln hc${hostColor(run.host)}`, dataset: { run: run.id, s: stream === "stderr" ? "err" : "out" } },
      h("span", { class: "pfx", title: stream === "stderr" ? `${run.host} (stderr)` : run.host }, run.host));
    if (this.focusRun && this.focusRun !== run.id) line.hidden = true;
    this.el.append(line);
    this.lines++;
    if (this.lines > MAX_LINES) this.trim();
    return line;
  }

  trim() {
    const drop = Math.ceil(MAX_LINES / 10);
    for (let i = 0; i < drop && this.el.firstChild; i++) this.el.firstChild.remove();
    this.lines -= drop;
    if (!this.trimmed) {
      this.trimmed = true;
      if (this.onTrim) this.onTrim();
    }
  }

  focus(runId) {
    this.focusRun = runId;
    this.el.classList.toggle("focus", Boolean(runId));
    for (const line of this.el.children) line.hidden = Boolean(runId) && line.dataset.run !== runId;
    this.stick = true;
    this.queueScroll();
  }

  atBottom() {
    return this.el.scrollTop + this.el.clientHeight >= this.el.scrollHeight - 8;
  }

  queueScroll() {
    if (this.scrollQueued) return;
    this.scrollQueued = true;
    requestAnimationFrame(() => {
      this.scrollQueued = false;
      if (this.stick) this.el.scrollTop = this.el.scrollHeight;
      this.syncFollow();
    });
  }

  onScroll() {
    this.stick = this.atBottom();
    this.syncFollow();
  }

  syncFollow() {
    const button = $("output-follow");
    const show = !this.stick && this.el.scrollHeight > this.el.clientHeight;
    if (button.hidden === show) button.hidden = !show;
  }
}

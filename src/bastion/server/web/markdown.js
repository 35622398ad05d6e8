// A small markdown renderer for model output that cannot inject HTML: it only ever
// creates elements itself and puts the model's text in with text nodes (never
// innerHTML), so "<script>" or "<img onerror=...>" in an answer is shown as text.
// Links are kept only for http(s) URLs. Covers what chat answers use: fenced code,
// headings, lists, quotes, rules, paragraphs; inline code, bold, italic, links.
"use strict";

(function () {
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([^*\n]*[^\s*])\*|_(?=[^\s_])([^_\n]*[^\s_])_(?!\w)|\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g;

  function el(tag, cls) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    return node;
  }

  function inline(parent, text) {
    const re = new RegExp(INLINE.source, "g");  // own lastIndex: calls nest (bold inside a link...)
    let last = 0;
    for (let m = re.exec(text); m !== null; m = re.exec(text)) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      last = re.lastIndex;
      if (m[1] !== undefined) {
        const code = el("code");
        code.textContent = m[2];
        parent.appendChild(code);
      } else if (m[3] !== undefined || m[4] !== undefined) {
        inline(parent.appendChild(el("strong")), m[3] !== undefined ? m[3] : m[4]);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        inline(parent.appendChild(el("em")), m[5] !== undefined ? m[5] : m[6]);
      } else {
        const a = el("a");
        a.href = m[8];  // matched ^https?:// above: no javascript: or data: URLs
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        a.textContent = m[7];
        parent.appendChild(a);
      }
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function lines(parent, textLines) {  // a paragraph's lines, joined by <br>
    textLines.forEach((line, i) => {
      if (i) parent.appendChild(el("br"));
      inline(parent, line);
    });
  }

  const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

  function render(text) {
    const root = document.createDocumentFragment();
    const src = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < src.length) {
      const line = src[i];
      let m;
      if ((m = FENCE.exec(line))) {  // an unclosed fence (still streaming) runs to the end
        const body = [];
        for (i++; i < src.length && !src[i].trim().startsWith(m[1]); i++) body.push(src[i]);
        i++;
        const pre = root.appendChild(el("pre"));
        const code = pre.appendChild(el("code"));
        if (m[2]) code.dataset.lang = m[2];
        code.textContent = body.join("\n");
      } else if (!line.trim()) {
        i++;
      } else if ((m = HEADING.exec(line))) {
        inline(root.appendChild(el("h" + Math.min(6, m[1].length + 2))), m[2]);
        i++;
      } else if (RULE.test(line)) {
        root.appendChild(el("hr"));
        i++;
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const re = BULLET.test(line) ? BULLET : NUMBERED;
        const list = root.appendChild(el(re === BULLET ? "ul" : "ol"));
        for (; i < src.length && (m = re.exec(src[i])); i++) inline(list.appendChild(el("li")), m[1]);
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; i < src.length && (m = QUOTE.exec(src[i])); i++) body.push(m[1]);
        lines(root.appendChild(el("blockquote")), body);
      } else {
        const body = [];
        for (; i < src.length && src[i].trim() && !FENCE.test(src[i]) && !HEADING.test(src[i])
               && !BULLET.test(src[i]) && !NUMBERED.test(src[i]) && !QUOTE.test(src[i]); i++) body.push(src[i]);
        lines(root.appendChild(el("p")), body);
      }
    }
    return root;
  }

  window.BastionMarkdown = { render };
})();

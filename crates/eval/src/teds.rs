//! Table recognition (PubTabNet, FinTabNet): TEDS, the tree-edit-distance similarity of
//! PubTabNet's `metric.py` (Zhong et al., 2020), and its structure-only variant S-TEDS.
//!
//! `TEDS = 1 - TED(pred, ref) / max(n_pred, n_ref)`, as the official code computes it:
//! - the tree is the first `<table>` (directly in the document, or in its `<html>`/`<body>`)
//!   and its descendant elements, except that a `td` is a leaf: what is inside it is its
//!   content. Only `td` is a cell; any other element (`th` included) is a structural node;
//! - a cell's content is the list of its characters and of `<tag>` / `</tag>` tokens for the
//!   elements inside it (so `<b>x</b>` is 3 tokens);
//! - deleting or inserting a node costs 1; renaming costs 1 when the tags, colspans or rowspans
//!   differ, else, for two cells of which one has content, the Levenshtein distance of the
//!   token lists over the longer length (S-TEDS ignores content: 0), else 0;
//! - `n` counts the elements below `<table>` (not the table itself, but the elements inside
//!   cells), as the official `len(table.xpath(".//*"))`.
//!
//! The HTML is read by a small tolerant parser that closes unclosed elements the way libxml2
//! (which the official code reads with, through lxml) does: a start tag closes the open element
//! when libxml2's table says so (`<td>` closes an open `td`, `th`, `b`, `i`, `u`, `span`, `font`,
//! `a`, `p`; `<tr>` closes `td`, `th`, `tr`; ...), an end tag closes the elements above its
//! match unless one of them ranks higher (`</td>` cannot close a `tr`), and the end of the text
//! closes everything. Comments, doctypes and processing instructions are dropped; `&amp;`,
//! `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&nbsp;` and numeric character references are decoded.
//!
//! Differences from the official code, none of which arise on PubTabNet's HTML: a bare
//! `<table>` fragment is read as if wrapped in `<html><body>` (the official code needs the
//! wrapper and scores a bare fragment 0); an unparsable colspan/rowspan counts as 1 (the
//! official code raises); two tables with no elements below `<table>` score 1 (the official
//! code divides by zero).

use crate::anls::edit_distance;

/// A table, read from HTML, ready to be compared.
#[derive(Debug)]
pub struct Table {
    root: Node,
    /// Elements below `<table>`, inside cells included.
    elements: usize,
}

impl Table {
    /// The first table of `html`; `None` when there is none.
    pub fn parse(html: &str) -> Option<Table> {
        let dom = Dom::parse(html);
        let table = dom.find_table(0)?;
        Some(Table { root: dom.tree(table), elements: dom.descendants(table) })
    }
}

/// TEDS of the table `prediction` holds against `reference`, content compared unless
/// `structure_only` (S-TEDS). A prediction without a table scores 0.
pub fn teds(prediction: &str, reference: &Table, structure_only: bool) -> f64 {
    let Some(prediction) = Table::parse(prediction) else {
        return 0.0;
    };
    let n = prediction.elements.max(reference.elements);
    let distance = tree_distance(&prediction.root, &reference.root, structure_only);
    if n == 0 {
        // Two bare `<table>`s: nothing to edit.
        return 1.0;
    }
    1.0 - distance / n as f64
}

/// A token of a cell's content.
#[derive(Debug, PartialEq)]
enum Token {
    Char(char),
    Open(String),
    Close(String),
}

/// A node of the tree TEDS compares.
#[derive(Debug)]
struct Node {
    tag: String,
    /// Present on `td` nodes, which have no children.
    cell: Option<Cell>,
    children: Vec<Node>,
}

#[derive(Debug)]
struct Cell {
    colspan: i64,
    rowspan: i64,
    content: Vec<Token>,
}

/// The cost of turning node `a` into node `b`, as the official `CustomConfig.rename`.
fn rename(a: &Node, b: &Node, structure_only: bool) -> f64 {
    match (&a.cell, &b.cell) {
        _ if a.tag != b.tag => 1.0,
        (Some(x), Some(y)) if (x.colspan, x.rowspan) != (y.colspan, y.rowspan) => 1.0,
        (Some(x), Some(y)) if !structure_only => {
            let longest = x.content.len().max(y.content.len());
            if longest == 0 {
                0.0
            } else {
                edit_distance(&x.content, &y.content) as f64 / longest as f64
            }
        }
        _ => 0.0,
    }
}

/// A tree in postorder, with what Zhang & Shasha's algorithm needs.
struct Postorder<'a> {
    nodes: Vec<&'a Node>,
    /// The postorder index of each node's leftmost leaf.
    leftmost: Vec<usize>,
    /// Nodes with no ancestor sharing their leftmost leaf, ascending.
    keyroots: Vec<usize>,
}

impl<'a> Postorder<'a> {
    fn new(root: &'a Node) -> Self {
        let mut tree = Postorder { nodes: Vec::new(), leftmost: Vec::new(), keyroots: Vec::new() };
        tree.visit(root);
        let mut last_with_leftmost = vec![0; tree.nodes.len()];
        for (k, &l) in tree.leftmost.iter().enumerate() {
            last_with_leftmost[l] = k;
        }
        tree.keyroots = (0..tree.nodes.len()).filter(|&k| last_with_leftmost[tree.leftmost[k]] == k).collect();
        tree
    }

    /// Appends `node`'s subtree; returns its leftmost leaf.
    fn visit(&mut self, node: &'a Node) -> usize {
        let mut first_leaf = None;
        for child in &node.children {
            let leaf = self.visit(child);
            first_leaf.get_or_insert(leaf);
        }
        let leftmost = first_leaf.unwrap_or(self.nodes.len());
        self.nodes.push(node);
        self.leftmost.push(leftmost);
        leftmost
    }
}

/// Tree edit distance (Zhang & Shasha, 1989): insertions and deletions cost 1, renames
/// [`rename`]. Exact, like the APTED the official code uses.
fn tree_distance(a: &Node, b: &Node, structure_only: bool) -> f64 {
    let (a, b) = (Postorder::new(a), Postorder::new(b));
    let mut tree = vec![vec![0.0_f64; b.nodes.len()]; a.nodes.len()];
    let mut forest = vec![vec![0.0_f64; b.nodes.len() + 1]; a.nodes.len() + 1];
    for &i in &a.keyroots {
        for &j in &b.keyroots {
            let (li, lj) = (a.leftmost[i], b.leftmost[j]);
            // forest[x - li + 1][y - lj + 1]: distance between the forests li..=x and lj..=y.
            forest[0][0] = 0.0;
            for x in li..=i {
                forest[x - li + 1][0] = forest[x - li][0] + 1.0;
            }
            for y in lj..=j {
                forest[0][y - lj + 1] = forest[0][y - lj] + 1.0;
            }
            for x in li..=i {
                for y in lj..=j {
                    let (dx, dy) = (x - li + 1, y - lj + 1);
                    let edit = (forest[dx - 1][dy] + 1.0).min(forest[dx][dy - 1] + 1.0);
                    forest[dx][dy] = if a.leftmost[x] == li && b.leftmost[y] == lj {
                        let d = edit.min(forest[dx - 1][dy - 1] + rename(a.nodes[x], b.nodes[y], structure_only));
                        tree[x][y] = d;
                        d
                    } else {
                        edit.min(forest[a.leftmost[x] - li][b.leftmost[y] - lj] + tree[x][y])
                    };
                }
            }
        }
    }
    tree[a.nodes.len() - 1][b.nodes.len() - 1]
}

// ------------------------------------------------------------------------------- HTML parsing

/// Elements that never have content (HTML 4's empty elements).
const VOID: [&str; 13] =
    ["area", "base", "basefont", "br", "col", "frame", "hr", "img", "input", "isindex", "link", "meta", "param"];

/// Whether the start tag `new` closes the open element `old`: libxml2's `htmlStartClose`
/// entries whose new tag belongs to tables, plus those that close paragraphs and headings.
fn start_closes(new: &str, old: &str) -> bool {
    let closed: &[&str] = match new {
        "td" | "th" => &["a", "b", "font", "i", "p", "span", "td", "th", "u"],
        "tr" => &["caption", "col", "colgroup", "p", "td", "th", "tr"],
        "thead" => &["caption", "col", "colgroup"],
        "tbody" => &["caption", "col", "colgroup", "p", "tbody", "td", "tfoot", "th", "thead", "tr"],
        "tfoot" => &["caption", "col", "colgroup", "p", "tbody", "td", "th", "thead", "tr"],
        "table" => &["a", "h1", "h2", "h3", "h4", "h5", "h6", "head", "listing", "p", "pre", "xmp"],
        "caption" => &["p"],
        "col" => &["caption", "p"],
        "colgroup" => &["caption", "col", "colgroup", "p"],
        "p" => &["b", "big", "h1", "h2", "h3", "h4", "h5", "h6", "i", "p", "s", "small", "strike", "tt", "u"],
        _ => &[],
    };
    closed.contains(&old)
}

/// libxml2's end-tag priority: an end tag never closes an element that ranks higher.
fn end_priority(tag: &str) -> u8 {
    match tag {
        "div" => 150,
        "td" | "th" => 160,
        "tr" => 170,
        "thead" | "tbody" | "tfoot" => 180,
        "table" => 190,
        "head" | "body" => 200,
        "html" => 220,
        _ => 100,
    }
}

#[derive(Debug)]
enum Child {
    Element(usize),
    Text(String),
}

#[derive(Debug)]
struct Element {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<Child>,
}

/// A parsed document: element 0 is the document itself.
struct Dom {
    elements: Vec<Element>,
}

impl Dom {
    fn parse(html: &str) -> Dom {
        let mut dom =
            Dom { elements: vec![Element { name: String::new(), attributes: Vec::new(), children: Vec::new() }] };
        let mut open = vec![0];
        let mut rest = html;
        while !rest.is_empty() {
            let (tag, after) = match rest.find('<') {
                Some(0) => read_tag(rest),
                Some(k) => (Tag::Text(&rest[..k]), &rest[k..]),
                None => (Tag::Text(rest), ""),
            };
            rest = after;
            match tag {
                Tag::Text(text) => dom.add_text(*open.last().unwrap_or(&0), text),
                Tag::Start { name, attributes, self_closing } => {
                    while open.len() > 1 && start_closes(&name, dom.name(&open)) {
                        open.pop();
                    }
                    let parent = *open.last().unwrap_or(&0);
                    let id = dom.elements.len();
                    dom.elements[parent].children.push(Child::Element(id));
                    let void = self_closing || VOID.contains(&name.as_str());
                    dom.elements.push(Element { name, attributes, children: Vec::new() });
                    if !void {
                        open.push(id);
                    }
                }
                Tag::End(name) => {
                    let priority = end_priority(&name);
                    for depth in (1..open.len()).rev() {
                        let current = &dom.elements[open[depth]].name;
                        if *current == name {
                            open.truncate(depth);
                            break;
                        }
                        if end_priority(current) > priority {
                            break;
                        }
                    }
                }
                Tag::Skipped => {}
            }
        }
        dom
    }

    /// The name of the innermost open element.
    fn name(&self, open: &[usize]) -> &str {
        open.last().map_or("", |&id| &self.elements[id].name)
    }

    fn add_text(&mut self, parent: usize, raw: &str) {
        let text = decode_entities(raw);
        match self.elements[parent].children.last_mut() {
            Some(Child::Text(previous)) => previous.push_str(&text),
            _ => self.elements[parent].children.push(Child::Text(text)),
        }
    }

    fn child_elements(&self, id: usize) -> impl Iterator<Item = usize> + '_ {
        self.elements[id].children.iter().filter_map(|c| match c {
            Child::Element(e) => Some(*e),
            Child::Text(_) => None,
        })
    }

    /// The first `table` child of `id`, looking through `html` and `body` elements.
    fn find_table(&self, id: usize) -> Option<usize> {
        self.child_elements(id).find_map(|child| match self.elements[child].name.as_str() {
            "table" => Some(child),
            "html" | "body" => self.find_table(child),
            _ => None,
        })
    }

    fn descendants(&self, id: usize) -> usize {
        self.child_elements(id).map(|child| 1 + self.descendants(child)).sum()
    }

    /// The TEDS tree below element `id`, as the official `load_html_tree`.
    fn tree(&self, id: usize) -> Node {
        let element = &self.elements[id];
        if element.name == "td" {
            let mut content = Vec::new();
            self.tokenize_children(id, &mut content);
            let span = |name: &str| {
                element.attributes.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.trim().parse().ok()).unwrap_or(1)
            };
            let cell = Cell { colspan: span("colspan"), rowspan: span("rowspan"), content };
            return Node { tag: element.name.clone(), cell: Some(cell), children: Vec::new() };
        }
        Node {
            tag: element.name.clone(),
            cell: None,
            children: self.child_elements(id).map(|c| self.tree(c)).collect(),
        }
    }

    /// The content tokens of element `id`'s children, as the official `tokenize`: the text
    /// after a nested `td` is dropped, as there.
    fn tokenize_children(&self, id: usize, tokens: &mut Vec<Token>) {
        let mut after_td = false;
        for child in &self.elements[id].children {
            match child {
                Child::Text(text) if !after_td => tokens.extend(text.chars().map(Token::Char)),
                Child::Text(_) => {}
                Child::Element(e) => {
                    let name = &self.elements[*e].name;
                    tokens.push(Token::Open(name.clone()));
                    self.tokenize_children(*e, tokens);
                    tokens.push(Token::Close(name.clone()));
                }
            }
            after_td = matches!(child, Child::Element(e) if self.elements[*e].name == "td");
        }
    }
}

/// One piece of HTML source.
enum Tag<'a> {
    Text(&'a str),
    Start {
        name: String,
        attributes: Vec<(String, String)>,
        self_closing: bool,
    },
    End(String),
    /// A comment, doctype, processing instruction or truncated tag.
    Skipped,
}

/// Reads the markup at the start of `s` (which starts with `<`); returns it and the rest.
fn read_tag(s: &str) -> (Tag<'_>, &str) {
    let after = |marker: &str, from: usize| s[from..].find(marker).map_or("", |k| &s[from + k + marker.len()..]);
    if s.starts_with("<!--") {
        return (Tag::Skipped, after("-->", 4));
    }
    if s.starts_with("<!") || s.starts_with("<?") {
        return (Tag::Skipped, after(">", 2));
    }
    let (is_end, start) = if s.starts_with("</") { (true, 2) } else { (false, 1) };
    if !s[start..].starts_with(|c: char| c.is_ascii_alphabetic()) {
        // A lone `<` is text.
        return (Tag::Text(&s[..1]), &s[1..]);
    }
    let name_len =
        s[start..].find(|c: char| c.is_ascii_whitespace() || c == '>' || c == '/').unwrap_or(s.len() - start);
    let name = s[start..start + name_len].to_ascii_lowercase();
    let mut rest = &s[start + name_len..];
    let mut attributes = Vec::new();
    let mut self_closing = false;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
        if let Some(r) = rest.strip_prefix('>') {
            rest = r;
            break;
        }
        if let Some(r) = rest.strip_prefix("/>") {
            self_closing = true;
            rest = r;
            break;
        }
        if rest.is_empty() {
            return (Tag::Skipped, "");
        }
        if let Some(r) = rest.strip_prefix('/') {
            rest = r;
            continue;
        }
        let key_len = rest.find(|c: char| c.is_ascii_whitespace() || "=>/".contains(c)).unwrap_or(rest.len()).max(1);
        let key = rest[..key_len].to_ascii_lowercase();
        rest = rest[key_len..].trim_start_matches(|c: char| c.is_ascii_whitespace());
        let mut value = String::new();
        if let Some(r) = rest.strip_prefix('=') {
            let r = r.trim_start_matches(|c: char| c.is_ascii_whitespace());
            let (raw, after_value) = match r.chars().next() {
                Some(q @ ('"' | '\'')) => match r[1..].find(q) {
                    Some(k) => (&r[1..1 + k], &r[k + 2..]),
                    None => (&r[1..], ""),
                },
                _ => {
                    let k = r.find(|c: char| c.is_ascii_whitespace() || c == '>').unwrap_or(r.len());
                    (&r[..k], &r[k..])
                }
            };
            value = decode_entities(raw);
            rest = after_value;
        }
        attributes.push((key, value));
    }
    let tag = if is_end { Tag::End(name) } else { Tag::Start { name, attributes, self_closing } };
    (tag, rest)
}

/// `text` with the common named and all numeric character references decoded; anything
/// else is kept as written.
fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(k) = rest.find('&') {
        out.push_str(&rest[..k]);
        rest = &rest[k..];
        let decoded = rest.find(';').filter(|&end| end <= 10).and_then(|end| {
            let name = &rest[1..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let code = match name.strip_prefix('#') {
                        Some(hex) if hex.starts_with(['x', 'X']) => u32::from_str_radix(&hex[1..], 16).ok(),
                        Some(dec) => dec.parse().ok(),
                        None => None,
                    };
                    code.and_then(char::from_u32)
                }
            };
            c.map(|c| (c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

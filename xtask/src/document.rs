//! A report as one document value — titled sections of paragraphs, lists, tables, plots
//! and code — and its four renderings (Markdown, HTML, CSV, JSON), so that every format
//! shows all of it and none drifts from the others.

use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

/// A whole report: a title and its sections, in order.
#[derive(Clone, Debug, Serialize)]
pub struct Document {
    /// Plain text; `code` spans in backticks.
    pub title: String,
    pub sections: Vec<Section>,
}

/// A headed part of a document.
#[derive(Clone, Debug, Serialize)]
pub struct Section {
    pub heading: String,
    pub blocks: Vec<Block>,
}

/// One piece of a section. Text in paragraphs, list items and table cells may hold
/// `**strong**` and `` `code` `` spans, which each renderer turns into its own markup.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Block {
    Paragraph {
        text: String,
    },
    List {
        items: Vec<String>,
    },
    Table {
        headers: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// An image file beside the report (an SVG plot), with what it shows.
    Plot {
        file: String,
        caption: String,
    },
    Code {
        language: String,
        text: String,
    },
}

impl Section {
    pub fn new(heading: impl Into<String>, blocks: Vec<Block>) -> Self {
        Section {
            heading: heading.into(),
            blocks,
        }
    }
}

impl Block {
    pub fn paragraph(text: impl Into<String>) -> Self {
        Block::Paragraph { text: text.into() }
    }

    pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> Self {
        Block::Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows,
        }
    }
}

/// The document as Markdown.
pub fn markdown(doc: &Document) -> String {
    let mut s = format!("# {}\n", doc.title);
    for section in &doc.sections {
        let _ = write!(s, "\n## {}\n", section.heading);
        for block in &section.blocks {
            s.push('\n');
            match block {
                Block::Paragraph { text } => {
                    let _ = writeln!(s, "{text}");
                }
                Block::List { items } => {
                    for item in items {
                        let _ = writeln!(s, "- {}", item.replace('\n', " "));
                    }
                }
                Block::Table { headers, rows } => s.push_str(&markdown_table(headers, rows)),
                Block::Plot { file, caption } => {
                    let _ = writeln!(s, "![{caption}]({file})");
                }
                Block::Code { language, text } => {
                    let _ = writeln!(s, "```{language}\n{}\n```", text.trim_end());
                }
            }
        }
    }
    s
}

fn markdown_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let cell = |c: &String| c.replace('|', "\\|").replace('\n', " ");
    let mut s = format!(
        "| {} |\n|{}|\n",
        headers.iter().map(cell).collect::<Vec<_>>().join(" | "),
        vec!["---"; headers.len()].join("|")
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", r.iter().map(cell).collect::<Vec<_>>().join(" | "));
    }
    s
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}\
    table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}\
    td:first-child,td:nth-child(2),th{text-align:left}pre{background:#f6f6f6;padding:1em}";

/// The document as one self-contained HTML page; `svg(file)` gives the text of each
/// plot, which is inlined.
pub fn html(doc: &Document, svg: impl Fn(&str) -> Result<String>) -> Result<String> {
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(&doc.title.replace('`', "")),
        inline(&doc.title)
    );
    for section in &doc.sections {
        let _ = writeln!(s, "<h2>{}</h2>", inline(&section.heading));
        for block in &section.blocks {
            match block {
                Block::Paragraph { text } => {
                    let _ = writeln!(s, "<p>{}</p>", inline(text));
                }
                Block::List { items } => {
                    s.push_str("<ul>");
                    for item in items {
                        let _ = write!(s, "<li>{}</li>", inline(item));
                    }
                    s.push_str("</ul>\n");
                }
                Block::Table { headers, rows } => s.push_str(&html_table(headers, rows)),
                Block::Plot { file, caption } => {
                    let text = svg(file)?;
                    let text = text.trim_start_matches(|c| c != '<');
                    let body = text
                        .strip_prefix("<?xml")
                        .map_or(text, |r| r.split_once("?>").map_or(r, |x| x.1));
                    let _ = writeln!(
                        s,
                        "<figure>{body}<figcaption>{} (<a href=\"{1}\">{1}</a>)</figcaption></figure>",
                        inline(caption),
                        escape(file)
                    );
                }
                Block::Code { text, .. } => {
                    let _ = writeln!(s, "<pre>{}</pre>", escape(text));
                }
            }
        }
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

fn html_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><tr>");
    for h in headers {
        let _ = write!(s, "<th>{}</th>", inline(h));
    }
    s.push_str("</tr>\n");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", inline(c));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Escaped text with `**strong**` and `` `code` `` spans as HTML elements.
fn inline(s: &str) -> String {
    let span = |text: &str, mark: &str, tag: &str, inner: &dyn Fn(&str) -> String| {
        let mut out = String::new();
        let parts: Vec<&str> = text.split(mark).collect();
        // An unpaired mark stays as it is.
        let paired = parts.len() % 2 == 1;
        for (i, part) in parts.iter().enumerate() {
            if i % 2 == 1 && (paired || i + 1 < parts.len()) {
                let _ = write!(out, "<{tag}>{}</{tag}>", inner(part));
            } else {
                if i % 2 == 1 {
                    out.push_str(mark);
                }
                out.push_str(&inner(part));
            }
        }
        out
    };
    span(s, "`", "code", &|t| span(t, "**", "strong", &escape))
}

/// The document as CSV in long form, one row per piece of text: the section, the
/// block's number in it and its kind, the row (table row or list item from 1; 0 for
/// a table's header and for single texts), the column (a table's header, or what the
/// text is) and the text.
pub fn csv(doc: &Document) -> String {
    let mut s = String::from("section,block,kind,row,column,text\n");
    let mut row = |section: &str, block: usize, kind: &str, row: usize, column: &str, text: &str| {
        let fields = [
            csv_field(section),
            block.to_string(),
            kind.to_string(),
            row.to_string(),
            csv_field(column),
            csv_field(text),
        ];
        s.push_str(&fields.join(","));
        s.push('\n');
    };
    row("", 0, "title", 0, "title", &doc.title);
    for section in &doc.sections {
        let h = section.heading.as_str();
        for (b, block) in section.blocks.iter().enumerate().map(|(b, x)| (b + 1, x)) {
            match block {
                Block::Paragraph { text } => row(h, b, "paragraph", 0, "text", text),
                Block::List { items } => {
                    for (i, item) in items.iter().enumerate() {
                        row(h, b, "list", i + 1, "item", item);
                    }
                }
                Block::Table { headers, rows } => {
                    for (c, header) in headers.iter().enumerate() {
                        row(h, b, "table", 0, &format!("{}", c + 1), header);
                    }
                    for (r, cells) in rows.iter().enumerate() {
                        for (header, cell) in headers.iter().zip(cells) {
                            row(h, b, "table", r + 1, header, cell);
                        }
                    }
                }
                Block::Plot { file, caption } => {
                    row(h, b, "plot", 0, "file", file);
                    row(h, b, "plot", 0, "caption", caption);
                }
                Block::Code { language, text } => row(h, b, "code", 0, language, text),
            }
        }
    }
    s
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The document as JSON.
pub fn json(doc: &Document) -> Result<String> {
    Ok(serde_json::to_string_pretty(doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Document {
        Document {
            title: "Experiment `tiny`".into(),
            sections: vec![
                Section::new(
                    "Reading",
                    vec![
                        Block::paragraph("a <b> & **c**"),
                        Block::List {
                            items: vec!["one, two".into(), "**x** \"y\"".into()],
                        },
                    ],
                ),
                Section::new(
                    "Numbers",
                    vec![
                        Block::table(&["name", "a|b"], vec![vec!["n".into(), "1,5".into()]]),
                        Block::Plot {
                            file: "p.svg".into(),
                            caption: "a plot".into(),
                        },
                        Block::Code {
                            language: "toml".into(),
                            text: "x = 1\n".into(),
                        },
                    ],
                ),
            ],
        }
    }

    #[test]
    fn markdown_keeps_the_markup_and_escapes_table_pipes() {
        let md = markdown(&doc());
        assert!(
            md.starts_with("# Experiment `tiny`\n\n## Reading\n\na <b> & **c**\n"),
            "{md}"
        );
        assert!(md.contains("- one, two\n- **x** \"y\"\n"), "{md}");
        assert!(md.contains("| name | a\\|b |\n|---|---|\n| n | 1,5 |\n"), "{md}");
        assert!(
            md.contains("![a plot](p.svg)") && md.contains("```toml\nx = 1\n```"),
            "{md}"
        );
    }

    #[test]
    fn html_escapes_text_turns_spans_into_elements_and_inlines_plots() -> Result<()> {
        let html = html(&doc(), |file| {
            assert_eq!(file, "p.svg");
            Ok("<?xml version=\"1.0\"?>\n<svg id=\"p\"></svg>".into())
        })?;
        assert!(html.contains("<h1>Experiment <code>tiny</code></h1>"), "{html}");
        assert!(
            html.contains("<p>a &lt;b&gt; &amp; <strong>c</strong></p>"),
            "{html}"
        );
        assert!(
            html.contains("<li><strong>x</strong> &quot;y&quot;</li>"),
            "{html}"
        );
        assert!(
            html.contains(
                "<figure>\n<svg id=\"p\"></svg><figcaption>a plot (<a href=\"p.svg\">p.svg</a>)</figcaption>"
            ),
            "{html}"
        );
        assert!(!html.contains("<?xml"));
        assert!(
            html.contains("<th>a|b</th>") && html.contains("<pre>x = 1\n</pre>"),
            "{html}"
        );
        // An unpaired mark is left as text.
        assert_eq!(inline("2 ** 3"), "2 ** 3");
        Ok(())
    }

    #[test]
    fn csv_has_one_row_per_text_quoted_where_needed() {
        let csv = csv(&doc());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "section,block,kind,row,column,text");
        assert!(lines.contains(&"Reading,2,list,1,item,\"one, two\""), "{csv}");
        assert!(
            lines.contains(&"Reading,2,list,2,item,\"**x** \"\"y\"\"\""),
            "{csv}"
        );
        assert!(lines.contains(&"Numbers,1,table,0,2,a|b"), "{csv}");
        assert!(lines.contains(&"Numbers,1,table,1,a|b,\"1,5\""), "{csv}");
        assert!(lines.contains(&"Numbers,2,plot,0,file,p.svg"), "{csv}");
        // title + paragraph + 2 items + 2 headers + 2 cells + 2 plot rows + the code's
        // first line (its text holds a line break, so it is quoted over two lines).
        assert_eq!(lines.len(), 1 + 1 + 1 + 2 + 2 + 2 + 2 + 2);
    }
}

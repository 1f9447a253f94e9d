//! Plain-text tables for reports and benchmarks.

/// Left-aligned columns separated by two spaces.
pub fn table(title: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c}{}", " ".repeat(w[i] - c.chars().count()))).collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = format!("{title}\n");
    out += &line(head.to_vec());
    out.push('\n');
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
        out.push('\n');
    }
    out
}

//! Text helpers of the screens: colour (only on a terminal, never with `NO_COLOR`),
//! aligned tables, ages and sizes as kubectl prints them.

use std::io::IsTerminal;

/// A colour of the screen, by meaning rather than hue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    /// Healthy, done.
    Good,
    /// Moving or needs attention, not broken.
    Notice,
    /// Broken or failed.
    Bad,
    /// Headings.
    Heading,
    /// Secondary detail.
    Faint,
}

/// Whether to colour the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    /// Emit ANSI colour codes.
    pub color: bool,
}

impl Style {
    /// No colour: for files, pipes, tests.
    pub const PLAIN: Style = Style { color: false };

    /// Colour when stdout is a terminal and `NO_COLOR` (https://no-color.org) is unset
    /// or empty: codes in a file or a pipe are noise.
    pub fn detect() -> Style {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            color: std::io::stdout().is_terminal() && !no_color,
        }
    }

    /// `text` in `tone`, or unchanged without colour.
    pub fn paint(&self, text: &str, tone: Tone) -> String {
        if !self.color || text.is_empty() {
            return text.to_string();
        }
        let code = match tone {
            Tone::Good => "32",
            Tone::Notice => "33",
            Tone::Bad => "31",
            Tone::Heading => "1",
            Tone::Faint => "2",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// A table: a header and rows of cells, each cell with an optional tone. Columns are
/// padded on the plain text, then painted, so colour codes never break the alignment.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<(String, Option<Tone>)>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header
                .iter()
                .map(|h| (h.to_string(), Some(Tone::Faint)))
                .collect()],
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<(String, Option<Tone>)>) {
        self.rows.push(cells);
    }

    /// The table, each line indented by two spaces; the last column is not padded.
    pub fn render(&self, style: &Style) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|(text, _)| text.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::from("  ");
            for (c, (text, tone)) in row.iter().enumerate() {
                let last = c + 1 == row.len();
                let pad = if last {
                    String::new()
                } else {
                    " ".repeat(widths[c] - text.chars().count() + 2)
                };
                match tone {
                    Some(tone) => line.push_str(&style.paint(text, *tone)),
                    None => line.push_str(text),
                }
                line.push_str(&pad);
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A cell without a tone.
pub fn cell(text: impl Into<String>) -> (String, Option<Tone>) {
    (text.into(), None)
}

/// A cell in `tone`.
pub fn toned(text: impl Into<String>, tone: Tone) -> (String, Option<Tone>) {
    (text.into(), Some(tone))
}

/// A span of seconds as kubectl prints ages: `45s`, `3m20s`, `42m`, `5h12m`, `3d4h`,
/// `40d`. Negative spans print as their absolute value.
pub fn duration(seconds: i64) -> String {
    let s = seconds.unsigned_abs();
    match s {
        0..120 => format!("{s}s"),
        120..600 if !s.is_multiple_of(60) => format!("{}m{}s", s / 60, s % 60),
        120..10_800 => format!("{}m", s / 60),
        10_800..172_800 if s % 3600 >= 60 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        10_800..172_800 => format!("{}h", s / 3600),
        172_800..864_000 if s % 86_400 >= 3600 => {
            format!("{}d{}h", s / 86_400, (s % 86_400) / 3600)
        }
        _ => format!("{}d", s / 86_400),
    }
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_ages() {
        let cases = [
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (200, "3m20s"),
            (240, "4m"),
            (2520, "42m"),
            (3 * 3600 + 12 * 60, "3h12m"),
            (5 * 3600, "5h"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (40 * 86_400, "40d"),
            (-90, "90s"),
        ];
        for (seconds, text) in cases {
            assert_eq!(duration(seconds), text, "{seconds}");
        }
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 + 200 * 1024 * 1024), "3.2 GiB");
    }

    #[test]
    fn tables_align_on_text_not_on_colour_codes() {
        let mut table = Table::new(&["NAME", "PHASE", "AGE"]);
        table.row(vec![
            cell("a-long-name"),
            toned("Failed", Tone::Bad),
            cell("5m"),
        ]);
        table.row(vec![cell("b"), toned("Completed", Tone::Good), cell("2h")]);
        let plain = table.render(&Style::PLAIN);
        assert_eq!(
            plain,
            "  NAME         PHASE      AGE\n  a-long-name  Failed     5m\n  b            Completed  2h\n"
        );
        let coloured = table.render(&Style { color: true });
        assert!(
            coloured.contains("\x1b[31mFailed\x1b[0m     5m"),
            "{coloured:?}"
        );
    }

    #[test]
    fn no_colour_means_no_escape_codes() {
        assert_eq!(Style::PLAIN.paint("Running", Tone::Good), "Running");
    }
}

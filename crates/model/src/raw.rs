//! The file as written: one struct per `[[table]]` kind, unknown keys refused.
//!
//! Values are kept as written ([`Val`]); units are parsed and checked in `validate`, which
//! knows the item and line to blame.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use toml::Spanned;

/// A scalar as written: a quantity with a unit is a string; plain numbers are kept to give a
/// helpful message (or, for `speed`, to be used).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Int(i64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Val, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Val;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quantity such as \"10ms\", \"1500B\" or \"100Mbit/s\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Val, E> {
                Ok(Val::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Val, E> {
                i64::try_from(v).map(Val::Int).map_err(|_| E::custom("number too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Val, E> {
                Ok(Val::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Val, E> {
                Ok(Val::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Val, E> {
                Ok(Val::Str(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    #[serde(default)]
    pub host: Vec<Spanned<RawHost>>,
    #[serde(default)]
    pub processor: Vec<Spanned<RawProcessor>>,
    #[serde(default)]
    pub link: Vec<Spanned<RawLink>>,
    #[serde(default)]
    pub vm: Vec<Spanned<RawVm>>,
    #[serde(default)]
    pub stream: Vec<Spanned<RawStream>>,
    #[serde(default)]
    pub task: Vec<Spanned<RawTask>>,
    #[serde(default)]
    pub chain: Vec<Spanned<RawChain>>,
    /// How VMs run (`vigil up`), see `crate::run`.
    #[serde(default)]
    pub run: Vec<Spanned<crate::run::RawRun>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub name: String,
    pub memory: Option<Val>,
    pub processors: Option<Vec<String>>,
    pub loopback: Option<Val>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcessor {
    pub name: String,
    pub policy: Option<String>,
    pub speed: Option<Val>,
    pub cycle: Option<Val>,
    pub latency: Option<Val>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLink {
    pub name: String,
    pub bandwidth: Option<Val>,
    pub policy: Option<String>,
    pub cycle: Option<Val>,
    pub latency: Option<Val>,
    /// The host whose network port this link is.
    pub host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVm {
    pub name: String,
    pub host: Option<String>,
    pub budget: Option<Val>,
    pub period: Option<Val>,
    pub policy: Option<String>,
    pub supply: Option<String>,
    pub cycle: Option<Val>,
    // The VM as one task:
    pub input: Option<String>,
    pub wcet: Option<Val>,
    pub bcet: Option<Val>,
    pub priority: Option<i64>,
    pub deadline: Option<Val>,
    pub slot: Option<Val>,
    // Deployment (hosts, redundancy, replication):
    pub instances: Option<Vec<String>>,
    pub mode: Option<String>,
    pub criticality: Option<i64>,
    pub memory: Option<Val>,
    pub backup: Option<String>,
    pub checkpoint_size: Option<Val>,
    pub checkpoint_interval: Option<Val>,
    pub checkpoint_priority: Option<i64>,
    /// Local redundancy: the voter's delay bound per reply (a component of the analysis).
    pub voting_delay: Option<Val>,
    /// Longest pause of the VM for one checkpoint (its reservation loses that much service
    /// once per `checkpoint_interval`).
    pub checkpoint_pause: Option<Val>,
    /// Longest time a network output of the VM is held until the checkpoint that covers it is
    /// acknowledged (added to chains whose output leaves the VM).
    pub output_commit: Option<Val>,
    /// The backup's staging of a checkpoint and its acknowledgement's way back: the part of an
    /// output's hold after the checkpoint's transfer (the `analysed` policy counts it).
    pub checkpoint_ack: Option<Val>,
    /// VMs it must never share a host with (anti-affinity, symmetric).
    pub apart: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub name: String,
    pub model: Option<String>,
    pub period: Option<Val>,
    pub jitter: Option<Val>,
    pub min_distance: Option<Val>,
    pub burst: Option<i64>,
    pub times: Option<Vec<Val>>,
    pub file: Option<String>,
    pub window: Option<Val>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTask {
    pub name: String,
    pub on: Option<String>,
    pub input: Option<String>,
    pub wcet: Option<Val>,
    pub bcet: Option<Val>,
    pub size: Option<Val>,
    pub min_size: Option<Val>,
    pub priority: Option<i64>,
    pub deadline: Option<Val>,
    pub slot: Option<Val>,
    /// Most work of 1, 2, … consecutive activations (times).
    pub workload_upper: Option<Vec<Val>>,
    /// Least work of 1, 2, … consecutive activations (times).
    pub workload_lower: Option<Vec<Val>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChain {
    pub name: String,
    pub tasks: Vec<String>,
    pub deadline: Option<Val>,
}

/// Files at least this long are read in two halves on two threads ([`read`]).
pub const SPLIT_READ_BYTES: usize = 64 * 1024;

/// Reads `text` as TOML into a [`RawFile`]. A file of [`SPLIT_READ_BYTES`] or more is read in two
/// halves on two threads, split at a line starting with `[[` near the middle, when both halves
/// read on their own: then every construct around the split is closed in the first half (a
/// multi-line string, array or inline table open across it leaves the first half unterminated,
/// an error), every key of the second half belongs to a table that starts in it, and since
/// every top-level key is an array of tables, the file is the first half's items followed by the
/// second's — the second half's spans shifted by the split's offset. Otherwise (either half
/// refused: a table of the second half that continues an item of the first, a construct across
/// the split, or an error anywhere) the whole text is read at once, which gives the error.
pub fn read(text: &str) -> Result<RawFile, toml::de::Error> {
    if text.len() >= SPLIT_READ_BYTES {
        if let Some(at) = split_point(text) {
            let (a, b) = text.split_at(at);
            let (ra, rb) = std::thread::scope(|s| {
                let second = s.spawn(|| toml::from_str::<RawFile>(b));
                (toml::from_str::<RawFile>(a), second.join())
            });
            if let (Ok(mut first), Ok(Ok(second))) = (ra, rb) {
                first.append(second, at);
                return Ok(first);
            }
        }
    }
    toml::from_str(text)
}

/// The start of the first line beginning with `[[` at or after the middle of `text`.
fn split_point(text: &str) -> Option<usize> {
    let mid = text.len() / 2;
    let from = (mid..text.len()).find(|&i| text.is_char_boundary(i))?;
    text[from..].match_indices("\n[[").next().map(|(i, _)| from + i + 1)
}

impl RawFile {
    /// Appends the items of `o`, read from the text at byte `offset` on.
    fn append(&mut self, o: RawFile, offset: usize) {
        fn shift<T>(to: &mut Vec<Spanned<T>>, from: Vec<Spanned<T>>, offset: usize) {
            to.extend(from.into_iter().map(|x| {
                let span = x.span();
                Spanned::new(span.start + offset..span.end + offset, x.into_inner())
            }));
        }
        // Every field named: a new kind of item must be appended here too.
        let RawFile { host, processor, link, vm, stream, task, chain, run } = o;
        shift(&mut self.host, host, offset);
        shift(&mut self.processor, processor, offset);
        shift(&mut self.link, link, offset);
        shift(&mut self.vm, vm, offset);
        shift(&mut self.stream, stream, offset);
        shift(&mut self.task, task, offset);
        shift(&mut self.chain, chain, offset);
        let first = self.run.len();
        shift(&mut self.run, run, offset);
        for r in &mut self.run[first..] {
            r.get_mut().shift(offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of independent fixed-priority tasks (`examples/pycpa/compare.py`'s shape), with
    /// `special` in the middle.
    fn big(special: &str) -> String {
        let part = |from: usize| {
            let mut t = String::new();
            for p in from..from + 50 {
                t += &format!("[[processor]]\nname = \"cpu{p}\"\npolicy = \"fp\"\n\n");
                for k in 0..10 {
                    t += &format!(
                        "[[stream]]\nname = \"st{p}_{k}\"\nmodel = \"pjd\"\nperiod = \"{}us\"\njitter = \"100us\"\n\n",
                        1000 * (k + 1)
                    );
                    t += &format!(
                        "[[task]]\nname = \"t{p}_{k}\"\non = \"cpu{p}\"\ninput = \"st{p}_{k}\"\nwcet = \"{}us\"\npriority = {}\n\n",
                        10 + k,
                        k + 1
                    );
                }
            }
            t
        };
        format!("{}{special}{}", part(0), part(50))
    }

    fn whole(text: &str) -> Result<String, String> {
        toml::from_str::<RawFile>(text).map(|r| format!("{r:?}")).map_err(|e| e.to_string())
    }

    fn split(text: &str) -> Result<String, String> {
        read(text).map(|r| format!("{r:?}")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_large_file_read_in_halves_is_read_as_a_whole() {
        let t = big("");
        assert!(t.len() >= SPLIT_READ_BYTES, "{}", t.len());
        let at = split_point(&t).expect("a split point");
        assert!(t[at..].starts_with("[[") && at >= t.len() / 2);
        // Items, their order and every span (shifted back into the whole text) are the same.
        let r = read(&t).unwrap();
        assert_eq!(r.task.len(), 1000);
        assert!(r.task.iter().any(|x| x.span().start > at));
        assert_eq!(split(&t), whole(&t));
        // Items of the second half really are read from there.
        let last = r.task.last().unwrap();
        assert!(t[last.span().start..].starts_with("[[task]]\nname = \"t99_9\""), "{:?}", &t[last.span()]);
    }

    #[test]
    fn tables_inside_an_item_of_the_second_half_keep_their_place() {
        let t = format!("{}[[run]]\nvm = \"v\"\n[[run.instance]]\nnumber = 2\nargs = [\"x\"]\n", big(""));
        let r = read(&t).unwrap();
        let inst = &r.run[0].get_ref().instance.as_ref().unwrap()[0];
        assert!(split_point(&t).unwrap() < r.run[0].span().start, "the run is in the second half");
        assert!(t[inst.span().start..].starts_with("[[run.instance]]\nnumber = 2"), "{:?}", &t[inst.span()]);
        assert_eq!(split(&t), whole(&t));
    }

    #[test]
    fn constructs_across_the_split_and_errors_read_as_in_the_whole_file() {
        let pad = "# padding\n".repeat(400);
        let cases = [
            // A multi-line string across the split, holding a line that starts with `[[`: the
            // whole file is valid, the first half alone is not.
            format!("[[processor]]\nname = \"\"\"\n{pad}[[task]]\nname = \"inside\"\n\"\"\"\n\n"),
            // A multi-line array across the split.
            format!("[[processor]]\nname = \"p\"\npolicy = [\n{pad}[[1]],\n]\n\n"),
            // A table of the second half continuing an item of the first.
            format!("[[task]]\nname = \"t\"\n{pad}[[vm]]\nname = \"v\"\n[task.extra]\nx = 1\n\n"),
            // An unknown kind of item, and a bad value, in the second half.
            format!("{pad}[[gadget]]\nname = \"g\"\n\n"),
            format!("{pad}[[task]]\nname = 7\n\n"),
            // A duplicate key in an item of the second half.
            format!("{pad}[[processor]]\nname = \"a\"\nname = \"b\"\n\n"),
        ];
        for special in cases {
            let t = big(&special);
            // The split falls inside the special part.
            let (from, at) = (t.find(&special).unwrap(), split_point(&t).unwrap());
            assert!(from < at && at < from + special.len(), "{special}");
            assert_eq!(split(&t), whole(&t), "{special}");
        }
    }
}

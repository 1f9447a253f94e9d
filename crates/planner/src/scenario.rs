//! Fault scenarios: sets of failed hosts and links.

use model::Deployment;
use rtc::system::System;

/// What fails together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scenario {
    /// Failed hosts (indices into [`Deployment::hosts`]).
    pub hosts: Vec<usize>,
    /// Failed links (resource indices): host ports or fixed links.
    pub links: Vec<usize>,
}

impl Scenario {
    /// A name for people: `hostA`, `hostA+portB`.
    pub fn name(&self, dep: &Deployment, sys: &System) -> String {
        let mut parts: Vec<&str> = self.hosts.iter().map(|&h| dep.hosts[h].name.as_str()).collect();
        parts.extend(self.links.iter().map(|&l| sys.resources[l].name.as_str()));
        parts.join("+")
    }
}

/// Every scenario of 1 to `k` failures among the hosts (and, with `links`, the links).
pub fn enumerate(dep: &Deployment, links: &[usize], k: usize, with_links: bool) -> Vec<Scenario> {
    #[derive(Clone, Copy)]
    enum Elem {
        Host(usize),
        Link(usize),
    }
    let mut elems: Vec<Elem> = (0..dep.hosts.len()).map(Elem::Host).collect();
    if with_links {
        elems.extend(links.iter().map(|&l| Elem::Link(l)));
    }
    let mut out = Vec::new();
    let mut pick: Vec<usize> = Vec::new();
    fn rec(elems: &[Elem], start: usize, k: usize, pick: &mut Vec<usize>, out: &mut Vec<Scenario>) {
        if !pick.is_empty() {
            let mut s = Scenario { hosts: Vec::new(), links: Vec::new() };
            for &i in pick.iter() {
                match elems[i] {
                    Elem::Host(h) => s.hosts.push(h),
                    Elem::Link(l) => s.links.push(l),
                }
            }
            out.push(s);
        }
        if pick.len() == k {
            return;
        }
        for i in start..elems.len() {
            pick.push(i);
            rec(elems, i + 1, k, pick, out);
            pick.pop();
        }
    }
    rec(&elems, 0, k, &mut pick, &mut out);
    out.sort_by_key(|s| s.hosts.len() + s.links.len());
    out
}

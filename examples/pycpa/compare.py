#!/usr/bin/env python3
"""vigil against pyCPA on the same independent fixed-priority tasks (docs/analysis.md §9).

    compare.py gen N PROCS DIR      write DIR/system.toml (vigil) and DIR/system.json (pyCPA)
    compare.py pycpa DIR/system.json  analyse with pyCPA (PYTHONPATH must reach pycpa), print
                                      one "task wcrt_us" line per task
    compare.py check DIR [VIGIL [RUNS]]  run both RUNS times (default 9), alternating, compare
                                      every WCRT, print medians of the process times and the load

N tasks on PROCS processors (N/PROCS each, rate-monotonic priorities), periodic with jitter,
periods 1-100 ms, utilisation at most 70 % per processor; times in integer µs, so both tools
compute the classical response-time analysis and must give identical bounds.
"""
import json, os, random, subprocess, sys, time

PERIODS = [1000, 2000, 5000, 10000, 20000, 25000, 50000, 100000]


def gen(n, procs, out, seed=7):
    rng = random.Random(seed)
    per = n // procs
    os.makedirs(out, exist_ok=True)
    tasks, toml = [], []
    for p in range(procs):
        toml.append(f'[[processor]]\nname = "cpu{p}"\npolicy = "fp"\n')
        left = 0.7
        ps = sorted(rng.choice(PERIODS) for _ in range(per))
        for k, period in enumerate(ps):
            c = max(1, int(period * left / (per - k) * rng.uniform(0.5, 1.0)))
            left -= c / period
            jitter = rng.choice([0, 0, period // 10])
            name = f"t{p}_{k}"
            tasks.append(dict(name=name, cpu=p, prio=k + 1, period=period, jitter=jitter, wcet=c))
            model = f'model = "pjd"\nperiod = "{period}us"\njitter = "{jitter}us"' if jitter else f'model = "periodic"\nperiod = "{period}us"'
            toml.append(f'[[stream]]\nname = "s{name}"\n{model}\n')
            toml.append(f'[[task]]\nname = "{name}"\non = "cpu{p}"\ninput = "s{name}"\nwcet = "{c}us"\npriority = {k + 1}\n')
    with open(os.path.join(out, "system.toml"), "w") as f:
        f.write("\n".join(toml))
    with open(os.path.join(out, "system.json"), "w") as f:
        json.dump(tasks, f)


def pycpa(path):
    sys.argv = sys.argv[:1]
    from pycpa import analysis, model, options, schedulers
    options.init_pycpa()
    with open(path) as f:
        tasks = json.load(f)
    s = model.System()
    res, objs = {}, []
    for t in tasks:
        r = res.get(t["cpu"])
        if r is None:
            r = res[t["cpu"]] = s.bind_resource(model.Resource(f"cpu{t['cpu']}", schedulers.SPPScheduler()))
        task = r.bind_task(model.Task(t["name"], wcet=t["wcet"], bcet=t["wcet"], scheduling_parameter=t["prio"]))
        task.in_event_model = model.PJdEventModel(P=t["period"], J=t["jitter"])
        objs.append(task)
    results = analysis.analyze_system(s)
    print("\n".join(f"R {t.name} {results[t].wcrt}" for t in objs))


def timed(cmd, env=None):
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    return time.perf_counter() - t, out


def check(d, vigil="target/release/vigil", repeat=9):
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYCPA", ""))
    tp, vp = [], []
    load0 = os.getloadavg()[0]
    for _ in range(repeat):
        t, p = timed([sys.executable, __file__, "pycpa", os.path.join(d, "system.json")], env)
        tp.append(t)
        t, v = timed([vigil, "analyze", os.path.join(d, "system.toml"), "--json"])
        vp.append(t)
    ours = {t["name"]: t["wcrt_us"] for t in json.loads(v.stdout)["tasks"]}
    theirs = dict(line.split()[1:] for line in p.stdout.splitlines() if line.startswith("R "))
    diff = [k for k in theirs if ours.get(k) != theirs[k]]
    tp.sort(), vp.sort()
    m = lambda xs: xs[len(xs) // 2]
    print(f"{len(theirs)} tasks, {len(diff)} different bounds{(': ' + str(diff[:5])) if diff else ''}")
    print(f"{repeat} runs each, load average {load0:.1f} before and {os.getloadavg()[0]:.1f} after")
    print(f"pyCPA {m(tp) * 1000:.0f} ms (min {tp[0] * 1000:.0f}), vigil {m(vp) * 1000:.1f} ms (min {vp[0] * 1000:.1f}), "
          f"ratio of medians {m(tp) / m(vp):.0f}x (range {tp[0] / vp[-1]:.0f}-{tp[-1] / vp[0]:.0f}x)")
    return 1 if diff else 0


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "gen":
        gen(int(a[2]), int(a[3]), a[4])
    elif a[1] == "pycpa":
        pycpa(a[2])
    elif a[1] == "check":
        sys.exit(check(a[2], *(a[3:4] or []), *[int(x) for x in a[4:5]]))

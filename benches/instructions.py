#!/usr/bin/env python3
"""Instructions per proxied GET of one or more vastshift binaries, side by side (callgrind).

Usage: python3 benches/instructions.py BIN [BIN ...]

Each binary serves on loopback in front of two demo backends (started from the first binary),
with a 50/50 split and the file store. Under `valgrind --tool=callgrind` it gets 3 s of
`wrk -t1 -c10` warm-up, then its counters are zeroed and it gets 8 s more. The figure is the
instructions counted divided by the requests `vastshift_requests_total` counted meanwhile, the
same method as benches/run.sh's callgrind step. Callgrind counts instructions, not time, so the
figures repeat whatever else the host is doing. Needs valgrind and wrk (Debian packages).
"""
import os, subprocess, sys, time, socket, http.client, tempfile
def free():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
work=tempfile.mkdtemp()
b1,b2=free(),free()
procs=[]
binA=sys.argv[1]
procs.append(subprocess.Popen([binA,"demo-backend","--listen",f"127.0.0.1:{b1}","--name","legacy"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
procs.append(subprocess.Popen([binA,"demo-backend","--listen",f"127.0.0.1:{b2}","--name","vastai"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
def run(binary, tag):
    p,a=free(),free()
    cfg=os.path.join(work,f"{tag}.toml")
    open(cfg,"w").write(f'[server]\nlisten = "127.0.0.1:{p}"\nadmin_listen = "127.0.0.1:{a}"\nstate_file = "{work}/s-{tag}.json"\n[legacy]\nurl = "http://127.0.0.1:{b1}"\n[vastai]\nurl = "http://127.0.0.1:{b2}"\n[split]\npercent = 50\n')
    out=os.path.join(work,f"cg-{tag}.out")
    v=subprocess.Popen(["valgrind","--tool=callgrind",f"--callgrind-out-file={out}",binary,"serve","--worker-threads","1","--config",cfg],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,env=dict(os.environ,VASTSHIFT_ADMIN_TOKEN="t"))
    for _ in range(300):
        try:
            c=http.client.HTTPConnection("127.0.0.1",p,timeout=2); c.request("GET","/"); c.getresponse().read(); break
        except Exception: time.sleep(0.2)
    subprocess.run(["wrk","-t1","-c10","-d3s",f"http://127.0.0.1:{p}/"],capture_output=True)
    subprocess.run(["callgrind_control","-z",str(v.pid)],capture_output=True)
    def total():
        c=http.client.HTTPConnection("127.0.0.1",a,timeout=5); c.request("GET","/metrics"); t=c.getresponse().read().decode()
        return sum(float(l.split()[-1]) for l in t.splitlines() if l.startswith("vastshift_requests_total"))
    before=total()
    subprocess.run(["wrk","-t1","-c10","-d8s",f"http://127.0.0.1:{p}/"],capture_output=True)
    after=total()
    subprocess.run(["callgrind_control","-d",str(v.pid)],capture_output=True); time.sleep(1)
    tot=[]
    for f in os.listdir(work):
        if f.startswith(f"cg-{tag}.out"):
            for l in open(os.path.join(work,f)):
                if l.startswith(("summary:","totals:")): tot.append(int(l.split()[1]))
    v.kill(); v.wait()
    print(f"{binary}: {max(tot)/(after-before):,.0f} instructions per GET over {int(after-before)} requests")
for i,b in enumerate(sys.argv[1:]):
    run(b, f"{i}-{os.path.basename(os.path.dirname(b)) or b}")
for p in procs: p.kill()

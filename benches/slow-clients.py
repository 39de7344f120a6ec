"""Slow and crowding clients against a vastshift binary, on loopback only.

  python3 benches/slow-clients.py BIN connects   # time for 5,000 back-to-back connects
  python3 benches/slow-clients.py BIN stalled    # RSS with 200 uploads stalled 1 byte short

Needs nginx (benches/run.sh installs it) as the backend.
"""
import socket, time, sys, os, subprocess, threading

BIN, MODE = sys.argv[1], sys.argv[2]
def fp():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
import tempfile
d=tempfile.mkdtemp()
L,P,A=fp(),fp(),fp()
# a legacy backend: nginx returning 200 after reading the body
ng=f"""worker_processes 1; daemon off; pid {d}/ng.pid; error_log {d}/err.log;
events {{ worker_connections 8192; }}
http {{ access_log off; client_max_body_size 10m; client_body_buffer_size 2m; server {{ listen 127.0.0.1:{L} backlog=8192; location / {{ return 200 "ok"; }} }} }}"""
open(f"{d}/ng.conf","w").write(ng)
ngp=subprocess.Popen(["nginx","-c",f"{d}/ng.conf"])
open(f"{d}/vs.toml","w").write(f"""[server]
listen = "127.0.0.1:{P}"
admin_listen = "127.0.0.1:{A}"
[legacy]
url = "http://127.0.0.1:{L}"
[vastai]
url = "http://127.0.0.1:{L}"
[split]
percent = 100.0
""")
env=dict(os.environ, VASTSHIFT_ADMIN_TOKEN="t", RUST_LOG="error")
vs=subprocess.Popen([BIN,"serve","--worker-threads","1","--config",f"{d}/vs.toml"],env=env)
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1",P),timeout=0.2).close(); break
    except OSError: time.sleep(0.1)
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])/1024
try:
    if MODE=="connects":
        import selectors
        t0=time.time(); socks=[]
        for i in range(5000):
            s=socket.socket(); s.setblocking(False)
            try: s.connect(("127.0.0.1",P))
            except BlockingIOError: pass
            socks.append(s)
        sel=selectors.DefaultSelector()
        for s in socks: sel.register(s, selectors.EVENT_WRITE)
        done=0
        while done<len(socks) and time.time()-t0<60:
            for key,_ in sel.select(timeout=1):
                sel.unregister(key.fileobj); done+=1
        print(f"{MODE}: {done} of 5000 connected in {time.time()-t0:.2f} s")
        for s in socks: s.close()
    else:
        base=rss(vs.pid); socks=[]
        body=b"a"*899000
        for i in range(200):
            s=socket.create_connection(("127.0.0.1",P))
            s.sendall(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 900000\r\n\r\n")
            socks.append(s)
        def feed(s):
            try: s.sendall(body)
            except OSError: pass
        ts=[threading.Thread(target=feed,args=(s,)) for s in socks]
        [t.start() for t in ts]; [t.join(30) for t in ts]
        time.sleep(3)
        print(f"{MODE}: RSS idle {base:.1f} MiB, with 200 uploads stalled at 899,000 of 900,000 bytes {rss(vs.pid):.1f} MiB")
        for s in socks: s.close()
finally:
    vs.kill(); ngp.kill()

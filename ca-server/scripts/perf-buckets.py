#!/usr/bin/env python3
"""Puts each sample of `perf script -F comm,ip,sym` output in one bucket (crypto, allocator,
compression, kernel scheduler/network/disk, sled, ...) by its leaf frame, then by its nearest named
caller, and prints the share of each. BENCHMARKS.md, "Where the time goes":

    perf record -F 999 -g -p <CA pid> -o perf.data -- sleep 25
    perf script -i perf.data -F comm,ip,sym > samples.txt
    python3 ca-server/scripts/perf-buckets.py samples.txt
"""
import sys, re, collections
def samples(path):
    comm=None; frames=[]
    for line in open(path, errors='replace'):
        if not line.strip():
            if comm is not None: yield comm, frames
            comm=None; frames=[]; continue
        if not line.startswith((' ','\t')):
            comm=line.strip(); frames=[]
        else:
            parts=line.strip().split(' ',1)
            frames.append(parts[1] if len(parts)>1 else '')
    if comm is not None: yield comm, frames
rules=[
 ("Ed25519 verification (token, CSR, own-signature check, TLS client cert)", r"ed25519::verification|ge_double_scalarmult_vartime|ge_p2_dbl|\bslide\b|ge_madd|x25519_ge_frombytes_vartime|fe_loose_invert"),
 ("Ed25519 signing (certificate, TLS CertificateVerify)", r"ed25519::signing|ge_scalarmult_base"),
 ("X25519 key exchange (TLS)", r"x25519_ecdh|x25519_scalar_mult|x25519_public"),
 ("other curve25519 arithmetic", r"curve25519|fe4_|x25519_ge|fe_"),
 ("SHA-2", r"sha512|sha256|sha2"),
 ("AES-GCM / ChaCha", r"aes|gcm|chacha|poly1305|ghash"),
 ("zstd (page compression)", r"ZSTD|HUF_|FSE_|HIST_|zstd"),
 ("kernel: scheduler, futex wakeups", r"finish_task_switch|_raw_spin_unlock_irqrestore|schedule|futex|try_to_wake_up"),
 ("kernel: disk I/O (virtio notify, ext4, writeback)", r"iowrite16|ext4|virtblk|blk_|filemap|folio|writeback|jbd2"),
 ("kernel: network (TCP/UDP loopback)", r"tcp_|udp_|ip_|skb|sock|net_|inet|loopback|__dev_queue|softirq"),
 ("malloc/free", r"malloc|_int_free|cfree|unlink_chunk|realloc|_int_realloc|memalign"),
 ("memcpy/memset/memcmp", r"memmove|memcpy|memset|memcmp"),
 ("sled (tree, page cache, log)", r"sled::|crossbeam"),
 ("rustls (handshake logic)", r"rustls"),
 ("x509/der parsing and building (x509-parser, rcgen, asn1)", r"x509|asn1|der_parser|rcgen|yasna"),
 ("CBOR/serde", r"ciborium|serde|coset"),
 ("tokio / hyper / coap", r"tokio|hyper|mio|coap"),
 ("prometheus metrics", r"prometheus"),
]
c=collections.Counter(); total=0
for comm, frames in samples(sys.argv[1]):
    total+=1
    # kernel-first: leaf frame decides when it is a kernel or libc frame
    joined=" | ".join(frames[:6])
    leaf=frames[0] if frames else ''
    cat=None
    for name,pat in rules:
        if re.search(pat, leaf):
            cat=name; break
    if cat is None:
        for name,pat in rules:
            if re.search(pat, joined):
                cat=name; break
    if cat is None:
        cat="kernel: other" if re.search(r"^ffffffff|entry_SYSCALL|do_syscall|syscall", joined) else "other"
    c[cat]+=1
for k,v in c.most_common():
    print(f"{100*v/total:5.1f}%  {k}")
print(total, "samples")

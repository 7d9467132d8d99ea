//! Datagram loss for CoAP runs: a UDP relay between the devices and the CA that drops a given
//! share of datagrams in each direction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// A small, fast generator for loss decisions (not for anything secret).
struct XorShift(u64);

impl XorShift {
    fn chance(&mut self, p: f64) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b) | 1
}

/// Starts the relay in front of `ca`; returns the address devices should use.
pub async fn start(ca: SocketAddr, loss: f64) -> Result<SocketAddr, String> {
    let front = Arc::new(
        UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?,
    );
    let addr = front.local_addr().map_err(|e| e.to_string())?;
    let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let mut rng = XorShift(seed());
        loop {
            let Ok((n, device)) = front.recv_from(&mut buf).await else {
                return;
            };
            let known = upstreams.lock().ok().and_then(|m| m.get(&device).cloned());
            let up = match known {
                Some(u) => u,
                None => {
                    let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    if u.connect(ca).await.is_err() {
                        continue;
                    }
                    let u = Arc::new(u);
                    if let Ok(mut m) = upstreams.lock() {
                        m.insert(device, u.clone());
                    }
                    let (back, front) = (u.clone(), front.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 8192];
                        let mut rng = XorShift(seed());
                        loop {
                            match back.recv(&mut b).await {
                                Ok(n) if !rng.chance(loss) => {
                                    let _ = front.send_to(&b[..n], device).await;
                                }
                                Ok(_) => {}
                                // The CA may be down for a moment (killed); keep relaying.
                                Err(_) => {
                                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                                }
                            }
                        }
                    });
                    u
                }
            };
            if !rng.chance(loss) {
                let _ = up.send(&buf[..n]).await;
            }
        }
    });
    Ok(addr)
}

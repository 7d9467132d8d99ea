//! The CoAP door's socket loop around [`Endpoint`]: one task owns the socket and the endpoint,
//! feeds it datagrams, job answers and timeouts, and sends what it queues; a fixed pool of
//! workers runs the enrollment jobs through the service (signing and committing are the slow
//! part), so that the number of tasks never grows with the number of datagrams. When the
//! workers' queue is full a request is dropped unanswered and the device's retransmission
//! brings it back later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol_spec::Problem;
use protocol_spec::coap::MAX_DATAGRAM;
use protocol_spec::enroll::RequestEncoding;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::{CoapConfig, CoapStats, Endpoint, EnrollJob, JobId};
use crate::limits::SourceRate;
use crate::service::CaService;

/// Serves CoAP on `socket` until `shutdown` turns true.
pub async fn serve(
    socket: UdpSocket,
    service: Arc<CaService>,
    config: CoapConfig,
    stats: Arc<CoapStats>,
    rate: Arc<SourceRate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ca_der = service.issuer().profile().ca_der().to_vec();
    let (job_tx, job_rx) = mpsc::channel::<EnrollJob>(config.queue.max(1));
    // Answers are bounded by the jobs out: the queue plus one per worker.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(JobId, Result<Vec<u8>, Problem>)>();
    let job_rx = Arc::new(tokio::sync::Mutex::new(job_rx));
    let mut workers = Vec::new();
    for _ in 0..config.workers.max(1) {
        let (service, job_rx, done_tx) = (service.clone(), job_rx.clone(), done_tx.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let job = { job_rx.lock().await.recv().await };
                let Some(job) = job else { return };
                let answer = enroll(&service, &job.body).await;
                if done_tx.send((job.id, answer)).is_err() {
                    return;
                }
            }
        }));
    }
    drop(done_tx);
    let mut endpoint = Endpoint::new(config, ca_der, rate, stats, std::process::id() as u16);
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let timeout = endpoint.poll_timeout();
        let wake = tokio::time::Instant::from_std(
            timeout.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        );
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, peer)) => {
                    if let Some(job) = endpoint.handle(Instant::now(), peer, &buf[..n])
                        && let Err(e) = job_tx.try_send(job)
                    {
                        endpoint.abandon(e.into_inner().id);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "UDP receive failed"),
            },
            Some((id, answer)) = done_rx.recv() => endpoint.complete(Instant::now(), id, answer),
            _ = tokio::time::sleep_until(wake), if timeout.is_some() => {
                endpoint.handle_timeout(Instant::now());
            }
            _ = shutdown.changed() => break,
        }
        // Answers that came in meanwhile go out with this turn's datagrams.
        while let Ok((id, answer)) = done_rx.try_recv() {
            endpoint.complete(Instant::now(), id, answer);
        }
        while let Some(t) = endpoint.poll_transmit() {
            // Non-blocking: if the socket buffer is full the datagram is lost, as any datagram
            // may be, and the peer retransmits.
            let _ = socket.try_send_to(&t.contents, t.destination);
        }
    }
    drop(job_tx);
    for w in workers {
        w.abort();
    }
}

/// One enrollment through the service: the CBOR EnrollResponse, or the problem.
async fn enroll(service: &CaService, body: &[u8]) -> Result<Vec<u8>, Problem> {
    let enrolled = service
        .enroll(body, RequestEncoding::Cbor, crate::metrics::Transport::Coap)
        .await?;
    let msg = service.response(&enrolled)?;
    Ok(msg.to_cbor())
}

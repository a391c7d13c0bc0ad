//! A DNS server for tests, standing in for a cluster's DNS: it answers
//! `A` queries for the names it was given (as CoreDNS does for a headless
//! Service: one address per ready pod), `SRV` queries for the named ports
//! it was given (`_http._tcp.<service>`), and `NXDOMAIN` for the rest.
//! Messages are parsed and written by `hickory-proto`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{RData, Record, RecordType};

/// Names (lower case, without the final dot) and what they answer.
type Zone = Arc<Mutex<HashMap<String, Answer>>>;

/// What a name answers.
#[derive(Clone)]
enum Answer {
    /// `A` records.
    Addresses(Vec<Ipv4Addr>),
    /// An `SRV` record: the port, on the name without its `_http._tcp.`.
    Port(u16),
}

/// A UDP DNS server on a thread of its own; stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Zone,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Serve on `bind` (e.g. a test bridge's gateway address, port 53).
    pub fn start(bind: SocketAddr) -> std::io::Result<DnsServer> {
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let zone = Zone::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (zone, queries, stop) = (zone.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Acquire) {
                    let Ok((len, peer)) = socket.recv_from(&mut buf) else { continue };
                    queries.fetch_add(1, Ordering::Relaxed);
                    if let Some(reply) = answer(&buf[..len], &zone) {
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        Ok(DnsServer { addr, zone, queries, stop, thread: Some(thread) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer `name` with `addresses` from now on (none: `NXDOMAIN`).
    pub fn set(&self, name: &str, addresses: &[Ipv4Addr]) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut zone = self.zone.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if addresses.is_empty() {
            zone.remove(&name);
        } else {
            zone.insert(name, Answer::Addresses(addresses.to_vec()));
        }
    }

    /// Answer `_http._tcp.<service>` with an SRV record naming `port` (a
    /// Service's port named `http`).
    pub fn set_http_port(&self, service: &str, port: u16) {
        let name = format!("_http._tcp.{}", service.trim_end_matches('.').to_ascii_lowercase());
        self.zone.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name, Answer::Port(port));
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The reply to one query message; `None` for what is not one.
fn answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    let zone = zone.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut code = ResponseCode::NoError;
    for question in request.queries() {
        reply.add_query(question.clone());
        let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        match zone.get(&name) {
            // A short TTL: a test changes the answer between calls.
            Some(Answer::Addresses(addresses)) if question.query_type() == RecordType::A => {
                for address in addresses {
                    reply.add_answer(Record::from_rdata(question.name().clone(), 1, RData::A(A(*address))));
                }
            }
            Some(Answer::Port(port)) if question.query_type() == RecordType::SRV => {
                let target = question.name().trim_to(question.name().num_labels() as usize - 2);
                let srv = SRV::new(0, 100, *port, target);
                reply.add_answer(Record::from_rdata(question.name().clone(), 1, RData::SRV(srv)));
            }
            // The name exists, without records of that type.
            Some(_) => {}
            None => code = ResponseCode::NXDomain,
        }
    }
    reply.set_response_code(code);
    reply.to_vec().ok()
}

//! `issuer init`: a new plant CA and its configuration.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::Error;

#[derive(Debug, clap::Args)]
pub(super) struct InitArgs {
    /// Folder to create the CA in.
    #[arg(long)]
    dir: PathBuf,
    /// SPIFFE trust domain, e.g. plant.example.
    #[arg(long)]
    trust_domain: String,
    /// Organization name in the CA certificates.
    #[arg(long, default_value = "Plant")]
    organization: String,
    /// EST listen address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Where to create the issuing CA key: soft:path=FILE, tpm:blob=FILE;tcti=…,
    /// tpm:handle=0x81…;tcti=…, or pkcs11:token=…;object=…;pin-file=…. A TPM or HSM key
    /// is created inside the device and never exists outside it.
    #[arg(long, default_value = "soft:path=ca/issuing.key")]
    ca_key: String,
    /// Plain-HTTP address serving the CRL (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    crl_listen: SocketAddr,
    /// Agent API (gRPC over TLS) listen address; default: the EST address's IP with port
    /// 8444, or port 0 when the EST port is 0.
    #[arg(long)]
    agent_api_listen: Option<SocketAddr>,
    /// DNS name of the EST server (repeatable; default localhost).
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// IP address of the EST server (repeatable; default 127.0.0.1 and ::1).
    #[arg(long = "ip")]
    ips: Vec<IpAddr>,
}

pub(super) async fn run(args: InitArgs) -> Result<(), Error> {
    let InitArgs {
        dir,
        trust_domain,
        organization,
        listen,
        ca_key,
        crl_listen,
        agent_api_listen,
        mut dns,
        mut ips,
    } = args;
    if dns.is_empty() {
        dns.push("localhost".into());
    }
    if ips.is_empty() {
        ips = vec![
            IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ];
    }
    let report = crate::init::run(&crate::init::InitOptions {
        dir,
        trust_domain,
        organization,
        listen,
        crl_listen,
        agent_api_listen: agent_api_listen.unwrap_or_else(|| {
            let port = if listen.port() == 0 {
                0
            } else {
                crate::config::DEFAULT_AGENT_API_PORT
            };
            SocketAddr::new(listen.ip(), port)
        }),
        ca_key,
        dns,
        ips,
    })
    .await?;
    say!("created {}", report.config.display());
    say!("root CA fingerprint (SHA-256): {}", report.root_fingerprint);
    say!(
        "start it with: issuer serve --config {}",
        report.config.display()
    );
    Ok(())
}

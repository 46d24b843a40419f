//! `workload_probe SOCKET`: one FetchX509SVID call, as a workload would make it; prints
//! `ok <spiffe id>` or `status <gRPC code name>`. The journeys run it as another user to
//! see how the agent treats a caller it has no entry for.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let socket: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: workload_probe SOCKET")?
        .into();
    let mut client = plant_tests::workload_client(&socket).await?;
    match client.fetch_x509svid(plant_tests::x509_request(true)).await {
        Ok(response) => {
            let mut stream = response.into_inner();
            match stream.message().await {
                Ok(Some(message)) => {
                    let id = message
                        .svids
                        .first()
                        .map(|s| s.spiffe_id.clone())
                        .unwrap_or_default();
                    println!("ok {id}");
                }
                Ok(None) => println!("status EndOfStream"),
                Err(status) => println!("status {:?}", status.code()),
            }
        }
        Err(status) => println!("status {:?}", status.code()),
    }
    Ok(())
}

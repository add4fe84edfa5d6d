//! Kafka client settings and topic creation, shared by the producer and the consumer.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::{JobError, Result};

/// Where the broker is and any extra librdkafka settings (`-X key=value` on the command line).
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Extra librdkafka properties, applied last so they can override ours.
    pub extra: Vec<(String, String)>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions { brokers: "127.0.0.1:9092".into(), extra: Vec::new() }
    }
}

impl KafkaOptions {
    /// A client configuration with the brokers, our defaults and then the user's overrides.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in &self.extra {
            config.set(k, v);
        }
        config
    }
}

/// Creates `topic` with `partitions` partitions unless it exists already, then waits until the
/// broker's metadata shows it (some brokers answer before the topic is usable).
pub async fn ensure_topic(kafka: &KafkaOptions, topic: &str, partitions: i32, replication: i32) -> Result<()> {
    if partitions < 1 {
        return Err(JobError::Config { option: "partitions", reason: format!("{partitions} is not at least 1") });
    }
    let admin: AdminClient<DefaultClientContext> = kafka.client_config(&[]).create().map_err(JobError::kafka("create admin client"))?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // All topics' metadata: asking for this one by name may auto-create it on some brokers,
    // with the broker's partition count instead of ours.
    let exists = |admin: &AdminClient<DefaultClientContext>| -> Result<bool> {
        let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10)).map_err(JobError::kafka(format!("metadata of {topic}")))?;
        Ok(metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
    };
    if exists(&admin)? {
        tracing::debug!(topic, "topic exists");
        return Ok(());
    }
    // A broker that cannot create topics (librdkafka's mock, a locked-down cluster) is fine as
    // long as the topic exists: the metadata check below decides.
    let refused = match admin.create_topics([&new_topic], &opts).await {
        Ok(results) => results.into_iter().find_map(|result| match result {
            Ok(_) => {
                tracing::info!(topic, partitions, "created topic");
                None
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
            Err((name, code)) => Some(JobError::Kafka { operation: format!("create topic {name}"), source: KafkaError::AdminOp(code) }),
        }),
        Err(e) => Some(JobError::Kafka { operation: format!("create topic {topic}"), source: e }),
    };
    for _ in 0..100 {
        if exists(&admin)? {
            return Ok(());
        }
        if let Some(e) = refused {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(JobError::Kafka {
        operation: format!("wait for topic {topic} to appear"),
        source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
    })
}

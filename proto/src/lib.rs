//! Protobuf payloads; generated code arrives with the MQTT issue.

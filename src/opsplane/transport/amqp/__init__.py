"""The RabbitMQ link (seed 002): exact topology and JSON messages of docs/amqp.md."""

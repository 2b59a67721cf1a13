from django.db import migrations, models


class Migration(migrations.Migration):
    """Transaction kind ``forfeit``: a hold (an audit's deposit) closed into the platform's fees."""

    dependencies = [
        ('ledger', '0006_idempotency_scope'),
    ]

    operations = [
        migrations.AlterField(
            model_name='transaction',
            name='kind',
            field=models.CharField(choices=[('grant', 'Grant'), ('hold', 'Hold'), ('capture', 'Capture'), ('release', 'Release'), ('payout', 'Payout'), ('clawback', 'Clawback'), ('forfeit', 'Forfeit')], max_length=16),
        ),
    ]
